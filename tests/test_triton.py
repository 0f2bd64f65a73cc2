"""The Triton kernels against 'reference', forward and backward, and as custom ops under torch.compile, in
Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernels are first compiled, so the check runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import copy
import torch
from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# max error / max(|reference|, 1). float32: summation order only. float16 / bfloat16: the reference runs in
# float32 on the same rounded inputs, so the gap is the triton run rounding its values, q and k, probabilities
# and outputs to the format, each <= u (unit roundoff 2^-11 / 2^-8), and tau amplifying the score error:
# (tau + 6) u. The half-precision cases run at tau = 1 (a fresh layer's tau = 10 would need a bound loose enough
# to pass a 5% error in a gradient): 8 u. The temperature's gradient sums every score of its head (B * N * W
# terms) and cancels most of them: 8 times more.
TOL = {F32: 1e-5, F16: 8 * 2**-11, BF16: 8 * 2**-8}
SUM_OF_SCORES_FACTOR = 8
cases = [
    (ConvPlus2d, (2, 8, 5, 7), dict(kernel_size=3, window=3, heads=2), F32),
    (ConvPlus2d, (1, 4, 6, 5), dict(kernel_size=3, window=5, dilation=(2, 1), heads=2, score="qk"), F32),
    (ConvPlus1d, (1, 4, 9), dict(kernel_size=5, window=5, heads=1, proj=False), F32),
    (ConvPlus3d, (1, 4, 3, 4, 3), dict(kernel_size=3, window=3, heads=2), F32),
    (ConvPlus2d, (1, 8, 5, 6), dict(kernel_size=3, window=3, heads=2), F16),
    (ConvPlus2d, (1, 8, 5, 6), dict(kernel_size=3, window=3, heads=2), BF16),
    (ConvPlus2d, (2, 4, 6, 6), dict(kernel_size=5, window=3, heads=2), F32),  # conv term apart
    (ConvPlus1d, (2, 4, 7), dict(kernel_size=3, window=5, heads=2, convolution=False), F32),
]
for cls, shape, kwargs, dtype in cases:
    torch.manual_seed(0)
    module = cls(shape[1], **kwargs).to(dtype)
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
        if dtype != F32:
            module.log_temperature.zero_()
    # the reference runs in float32 on exactly the triton run's inputs: x, weights and upstream gradient rounded
    x = torch.randn(shape).to(dtype)
    upstream = torch.randn(shape[0], module.out_channels, *shape[2:]).to(dtype)
    results = []
    for backend, m in (("reference", copy.deepcopy(module).float()), ("triton", module)):
        m.backend = backend
        xi = x.to(next(m.parameters()).dtype).detach().clone().requires_grad_(True)
        y = m(xi)
        (y.float() * upstream.float()).sum().backward()
        results.append([y.float().detach(), xi.grad.float()] + [p.grad.float() for p in m.parameters()])
    for name, got, want in zip(["y", "x", *dict(module.named_parameters())], results[1], results[0], strict=True):
        error = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)
        tol = TOL[dtype] * (SUM_OF_SCORES_FACTOR if name == "log_temperature" else 1)
        assert error <= tol, (cls.__name__, kwargs, dtype, name, error)
print("triton ok")
"""


OPS_CHECK = r"""
import torch
from convplus import ConvPlus2d
from convplus.backends.fused_window import fused_window
from convplus.backends.triton_kernels import window_mix
from convplus.neighborhood import Neighborhood
from torch.utils._python_dispatch import TorchDispatchMode


class Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


torch.manual_seed(0)
grid = (4, 5)
geometry = fused_window(grid, Neighborhood.of((3, 3), (1, 1), (True, False)), (3, 3))
where = (geometry.offsets, geometry.bounds, [1, *grid])
for taps in (None, torch.randn(2, 2, geometry.offsets.shape[0])):  # (K, D, W) taps, or no conv term in the pass
    inputs = [torch.randn(4, 3, 20), torch.randn(4, 3, 20), torch.randn(4, 2, 20), torch.rand(2) + 0.5, taps]
    inputs = [None if t is None else t.requires_grad_(True) for t in inputs]
    torch.library.opcheck(torch.ops.convplus.triton_window_mix, (*inputs, *where))
    out, attn, lse = window_mix(*inputs, *where)
    plain = [None if t is None else t.detach() for t in inputs]
    saved = (attn.detach(), lse.detach(), torch.randn_like(out))
    torch.library.opcheck(torch.ops.convplus.triton_window_mix_backward, (*plain, *where, *saved))
    recorded = Recording()
    with recorded:  # attn and lse have no gradient: none is filled with zeros for the backward
        out.sum().backward()
    assert not [name for name in recorded.names if "zero" in name or "fill" in name], recorded.names
for score in ("direct", "qk"):
    torch._dynamo.reset()
    module = ConvPlus2d(8, kernel_size=3, window=3, heads=2, score=score, backend="triton")
    x = torch.randn(1, 8, 5, 6, requires_grad=True)
    explained = torch._dynamo.explain(module)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if str(n.target).startswith("convplus.")}
    assert ops == {"convplus.triton_window_mix.default"}, ops
    results = []
    for run in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        y = run(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, *module.parameters()])))
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
print("triton ok")
"""


def _run_interpreted(script: str) -> None:
    """Runs ``script`` in a fresh process with TRITON_INTERPRET=1; it prints 'triton ok' when its checks pass."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok" in result.stdout


def test_triton_kernels_match_reference_in_the_interpreter():
    _run_interpreted(CHECK)


def test_triton_custom_ops_pass_opcheck_and_compile_without_graph_break():
    """The kernels' custom ops: schema, fake shapes, autograd registration and AOT dispatch (opcheck); a Conv+
    layer on the 'triton' backend compiles into one graph holding the op, whose forward and backward equal
    eager."""
    _run_interpreted(OPS_CHECK)
