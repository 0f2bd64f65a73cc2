"""The 'gathered' formulation (tiles of dense attention with a constant neighborhood bias): equal to
'reference', forward and backward, and exported to ONNX it runs in onnxruntime with the same result."""

from __future__ import annotations

import functools

import pytest
import torch

from convplus.backends import gathered, reference
from convplus.backends.terms import with_convolution_term

from .conftest import rel_err

reference_mix = with_convolution_term(reference.attend)

CASES = [  # grid, window, dilation, tile: tiles that overhang the grid, dilation groups, windows past the grid
    ((9, 11), (3, 5), (1, 2), 4),
    ((7, 7), (7, 7), (1, 1), 7),
    ((13, 13), (5, 5), (3, 3), 7),
    ((6, 6), (9, 9), (1, 1), 4),
    ((10,), (3,), (2,), 3),
    ((4, 5, 6), (3, 3, 5), (1, 2, 1), 3),
    ((1, 8), (3, 3), (1, 1), 5),
]


def _inputs(grid, window, dtype=torch.float64):
    batch, heads, dim = 2, 2, 3
    q, k, v = (torch.randn(batch, heads, dim, *grid, dtype=dtype, requires_grad=True) for _ in range(3))
    kernel = torch.randn(heads, dim, *window, dtype=dtype, requires_grad=True)
    gain = torch.randn(heads, dtype=dtype, requires_grad=True)
    bias = torch.randn(heads, dim, dtype=dtype, requires_grad=True)
    return q, k, v, kernel, gain, bias


@pytest.mark.parametrize(("grid", "window", "dilation", "tile"), CASES)
def test_tiled_attention_matches_reference_forward_and_backward(grid, window, dilation, tile):
    q, k, v, kernel, gain, bias = _inputs(grid, window)
    tensors = (q, k, v, kernel, gain, bias)
    outputs = [
        with_convolution_term(functools.partial(gathered.attend, tile=tile))(
            q, k, v, kernel, gain, window, dilation, bias
        ),
        reference_mix(q, k, v, kernel, gain, window, dilation, bias),
    ]
    weights = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad((out * weights).sum(), tensors) for out in outputs]
    assert rel_err(outputs[0], outputs[1]) <= 1e-12
    for got, expected in zip(*grads, strict=True):
        assert rel_err(got, expected) <= 1e-12


def test_gradcheck():
    grid, window, dilation = (5, 4), (3, 3), (2, 1)
    q, k, v, kernel, gain, bias = _inputs(grid, window)
    torch.autograd.gradcheck(
        lambda *t: gathered.mix(*t[:5], window, dilation, t[5]), (q, k, v, kernel, gain, bias), fast_mode=True
    )


def test_every_key_outside_a_window_is_excluded():
    """Scores of +1e4 on one key: a query whose window holds that key attends to it alone, any other query does
    not see it at all."""
    grid, window, dilation = (9, 9), (3, 3), (2, 2)
    q = torch.ones(1, 1, 1, *grid, dtype=torch.float64)
    k = torch.zeros_like(q)
    k[..., 4, 4] = 1e4
    v = torch.zeros_like(q)
    v[..., 4, 4] = 1.0
    z = gathered.attend(q, k, v, window, dilation)[0, 0, 0]
    expected = torch.zeros(grid, dtype=torch.float64)
    for i in (2, 4, 6):
        for j in (2, 4, 6):
            expected[i, j] = 1.0
    torch.testing.assert_close(z, expected)


class _Mixer(torch.nn.Module):
    def __init__(self, kernel, gain, window, dilation):
        super().__init__()
        self.kernel, self.gain = torch.nn.Parameter(kernel), torch.nn.Parameter(gain)
        self.window, self.dilation = window, dilation

    def forward(self, q, k, v):
        return gathered.mix(q, k, v, self.kernel, self.gain, self.window, self.dilation)


def test_torch_export_traces_the_indices_as_constants():
    """Non-strict torch.export (what torch.onnx.export tries first) runs the Python with fake tensors: the tile
    indices must come out as constants, not as data-dependent computations."""
    grid, window, dilation = (6, 7), (3, 5), (2, 1)
    q, k, v, kernel, gain, _ = (t.detach() for t in _inputs(grid, window))
    module = _Mixer(kernel, gain, window, dilation)
    program = torch.export.export(module, (q, k, v), strict=False)
    torch.testing.assert_close(program.module()(q, k, v), reference_mix(q, k, v, kernel, gain, window, dilation))


def test_onnx_export_runs_in_onnxruntime_with_the_same_result(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    grid, window, dilation = (10, 9), (5, 3), (1, 2)
    q, k, v, kernel, gain, _ = (t.detach().float() for t in _inputs(grid, window))
    module = _Mixer(kernel, gain, window, dilation).eval()
    path = tmp_path / "mixer.onnx"
    torch.onnx.export(module, (q, k, v), str(path), input_names=["q", "k", "v"], dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (z,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(z), reference_mix(q, k, v, kernel, gain, window, dilation)) <= 1e-5
