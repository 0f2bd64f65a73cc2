"""The Triton kernels against 'reference', forward and backward, in Triton's CPU interpreter.

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


def test_triton_kernels_match_reference_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok" in result.stdout
