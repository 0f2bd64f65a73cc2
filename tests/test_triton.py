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
import torch
from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d
cases = [
    (ConvPlus2d, (2, 8, 5, 7), dict(kernel_size=3, window=3, heads=2), torch.float32, 1e-5),
    (ConvPlus2d, (1, 4, 6, 5), dict(kernel_size=3, window=5, dilation=(2, 1), heads=2, score="qk"),
     torch.float32, 1e-5),
    (ConvPlus1d, (1, 4, 9), dict(kernel_size=5, window=5, heads=1, proj=False), torch.float32, 1e-5),
    (ConvPlus3d, (1, 4, 3, 4, 3), dict(kernel_size=3, window=3, heads=2), torch.float32, 1e-5),
    (ConvPlus2d, (1, 8, 5, 6), dict(kernel_size=3, window=3, heads=2), torch.float16, 2e-2),
    (ConvPlus2d, (1, 8, 5, 6), dict(kernel_size=3, window=3, heads=2), torch.bfloat16, 5e-2),
    (ConvPlus2d, (2, 4, 6, 6), dict(kernel_size=5, window=3, heads=2), torch.float32, 1e-5),  # conv term apart
    (ConvPlus1d, (2, 4, 7), dict(kernel_size=3, window=5, heads=2, convolution=False), torch.float32, 1e-5),
]
for cls, shape, kwargs, dtype, tol in cases:
    torch.manual_seed(0)
    module = cls(shape[1], **kwargs)
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
    x = torch.randn(shape)
    results = []
    for backend, dt in (("reference", torch.float32), ("triton", dtype)):
        m = module.to(dt)
        m.backend = backend
        xi = x.to(dt).detach().clone().requires_grad_(True)
        y = m(xi)
        y.float().square().sum().backward()
        grads = [xi.grad.float()] + [p.grad.float() for p in m.parameters()]
        results.append((y.float().detach(), grads))
        m.zero_grad(set_to_none=True)
    (y0, g0), (y1, g1) = results
    scale = lambda t: max(t.abs().max().item(), 1.0)
    assert (y1 - y0).abs().max().item() / scale(y0) <= tol, (cls.__name__, kwargs, "forward")
    for a, b in zip(g1, g0):
        assert (a - b).abs().max().item() / scale(b) <= 10 * tol, (cls.__name__, kwargs, "backward")
print("triton ok")
"""


def test_triton_kernels_match_reference_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok" in result.stdout
