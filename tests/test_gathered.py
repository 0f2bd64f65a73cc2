"""The 'gathered' formulation (tiles of dense attention with a constant neighborhood bias): equal to
'reference', forward and backward, for clipped, shifted and causal windows; what 'auto' runs under
``torch.export``; and exported to ONNX it runs in onnxruntime with the same result."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from convplus import ConvPlus2d, backends
from convplus.backends import gathered, reference
from convplus.backends.terms import with_convolution_term
from convplus.neighborhood import Neighborhood, dim_bounds

from .conftest import rel_err

reference_mix = with_convolution_term(reference.attend)

CASES = [  # grid, neighborhood, tile: tiles that overhang the grid, dilation groups, windows past the grid
    ((9, 11), Neighborhood.of((3, 5), (1, 2)), 4),
    ((7, 7), Neighborhood.of((7, 7), (1, 1)), 7),
    ((13, 13), Neighborhood.of((5, 5), (3, 3)), 7),
    ((6, 6), Neighborhood.of((9, 9), (1, 1)), 4),
    ((10,), Neighborhood.of((3,), (2,)), 3),
    ((4, 5, 6), Neighborhood.of((3, 3, 5), (1, 2, 1)), 3),
    ((1, 8), Neighborhood.of((3, 3), (1, 1)), 5),
    # causal: the halo reaches w - 1 steps back and none ahead
    ((12,), Neighborhood.of((5,), (1,), (True,)), 4),
    ((9, 8), Neighborhood.of((3, 5), (1, 1), (True, False)), 3),
    ((3, 4, 5), Neighborhood.of((3, 3, 3), (1, 1, 1), (True, False, False)), 2),
    # shift: an edge query's window reaches w - 1 steps inward
    ((11,), Neighborhood.of((5,), (1,), border="shift"), 3),
    ((7, 9), Neighborhood.of((5, 3), (1, 2), border="shift"), 4),
    ((4, 6, 5), Neighborhood.of((3, 5, 3), (1, 1, 2), border="shift"), 3),
    ((6, 6), Neighborhood.of((9, 9), (1, 1), border="shift"), 4),
    # causal and dilated, with shift on the other dims
    ((14,), Neighborhood.of((3,), (3,), (True,)), 3),
    ((10, 9), Neighborhood.of((3, 5), (2, 1), (True, False), "shift"), 4),
    ((5, 7, 6), Neighborhood.of((3, 3, 3), (2, 2, 1), (True, False, True), "shift"), 3),
]


def _inputs(grid, window, dtype=torch.float64):
    batch, heads, dim = 2, 2, 3
    q, k, v = (torch.randn(batch, heads, dim, *grid, dtype=dtype, requires_grad=True) for _ in range(3))
    kernel = torch.randn(heads, dim, *window, dtype=dtype, requires_grad=True)
    gain = torch.randn(heads, dtype=dtype, requires_grad=True)
    bias = torch.randn(heads, dim, dtype=dtype, requires_grad=True)
    return q, k, v, kernel, gain, bias


@pytest.mark.parametrize(("grid", "hood", "tile"), CASES)
def test_tiled_attention_matches_reference_forward_and_backward(grid, hood, tile):
    q, k, v, kernel, gain, bias = _inputs(grid, hood.window)
    tensors = (q, k, v, kernel, gain, bias)
    outputs = [
        with_convolution_term(functools.partial(gathered.attend, tile=tile))(q, k, v, kernel, gain, hood, bias),
        reference_mix(q, k, v, kernel, gain, hood, bias),
    ]
    weights = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad((out * weights).sum(), tensors) for out in outputs]
    assert rel_err(outputs[0], outputs[1]) <= 1e-12
    for got, expected in zip(*grads, strict=True):
        assert rel_err(got, expected) <= 1e-12


@pytest.mark.parametrize("border", ["clip", "shift"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_numpy_window_bounds_are_the_neighborhood_rule(causal, border):
    for size in range(1, 12):
        for window in (1, 3, 5, 7, 13):
            for dilation in (1, 2, 3):
                expected = dim_bounds(size, window, dilation, causal, border).numpy()
                np.testing.assert_array_equal(
                    gathered.dim_bounds_array(size, window, dilation, causal, border), expected
                )


def test_gradcheck():
    grid, hood = (5, 4), Neighborhood.of((3, 3), (2, 1), (False, True), "shift")
    q, k, v, kernel, gain, bias = _inputs(grid, hood.window)
    torch.autograd.gradcheck(lambda *t: gathered.mix(*t[:5], hood, t[5]), (q, k, v, kernel, gain, bias), fast_mode=True)


def test_every_key_outside_a_window_is_excluded():
    """Scores of +1e4 on one key: a query whose window holds that key attends to it alone, any other query does
    not see it at all."""
    grid, hood = (9, 9), Neighborhood.of((3, 3), (2, 2))
    q = torch.ones(1, 1, 1, *grid, dtype=torch.float64)
    k = torch.zeros_like(q)
    k[..., 4, 4] = 1e4
    v = torch.zeros_like(q)
    v[..., 4, 4] = 1.0
    z = gathered.attend(q, k, v, hood)[0, 0, 0]
    expected = torch.zeros(grid, dtype=torch.float64)
    for i in (2, 4, 6):
        for j in (2, 4, 6):
            expected[i, j] = 1.0
    torch.testing.assert_close(z, expected)


class _Mixer(torch.nn.Module):
    def __init__(self, kernel, gain, hood):
        super().__init__()
        self.kernel, self.gain = torch.nn.Parameter(kernel), torch.nn.Parameter(gain)
        self.hood = hood

    def forward(self, q, k, v):
        return gathered.mix(q, k, v, self.kernel, self.gain, self.hood)


def test_torch_export_traces_the_indices_as_constants():
    """Non-strict torch.export (what torch.onnx.export tries first) runs the Python with fake tensors: the tile
    indices and the bias must come out as constants, not as data-dependent computations."""
    grid, hood = (6, 7), Neighborhood.of((3, 5), (2, 1), (True, False), "shift")
    gathered.tiling.cache_clear()  # built while tracing, not taken from an eager call's cache
    q, k, v, kernel, gain, _ = (t.detach() for t in _inputs(grid, hood.window))
    module = _Mixer(kernel, gain, hood)
    program = torch.export.export(module, (q, k, v), strict=False)
    torch.testing.assert_close(program.module()(q, k, v), reference_mix(q, k, v, kernel, gain, hood))


def test_auto_picks_gathered_under_torch_export_only():
    picked = []

    class Picker(torch.nn.Module):
        def forward(self, x):
            picked.append(backends.select((20, 20), x.device, Neighborhood.of((7, 7), (1, 1))))
            return x + 1

    torch.export.export(Picker(), (torch.randn(2),), strict=False)
    Picker()(torch.randn(2))
    assert picked[0] == "gathered"
    assert picked[1] != "gathered"


def test_an_exported_auto_layer_runs_the_gathered_formulation():
    """ConvPlus2d(backend='auto') under torch.export: the tiles' gathers and no opaque kernel call in the graph,
    the same output."""
    layer = ConvPlus2d(4, heads=2, kernel_size=3, window=5, causal=(True, False), border="shift").eval()
    torch.nn.init.uniform_(layer.gain, 0.5, 1.5)
    x = torch.randn(1, 4, 16, 20)  # longer than a tile with its halo in both dims: tiles, not one dense block
    program = torch.export.export(layer, (x,), strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.index_select.default" in targets, targets  # the tiles' gathers
    assert not any("convplus" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_with_the_same_result(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    grid, hood = (10, 9), Neighborhood.of((5, 3), (1, 2), (False, True), "shift")
    q, k, v, kernel, gain, _ = (t.detach().float() for t in _inputs(grid, hood.window))
    module = _Mixer(kernel, gain, hood).eval()
    path = tmp_path / "mixer.onnx"
    torch.onnx.export(module, (q, k, v), str(path), input_names=["q", "k", "v"], dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (z,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(z), reference_mix(q, k, v, kernel, gain, hood)) <= 1e-5


@pytest.mark.parametrize(
    ("grid", "sides", "keys"),
    [
        ((56, 56), (4, 4), 100),  # long dims: small tiles, each with its halo
        ((28, 28), (4, 4), 100),
        ((14, 14), (14, 14), 196),  # short dims: one tile spans each, no halo and no gathers
        ((7, 7), (7, 7), 49),
        ((7, 56), (7, 4), 70),
    ],
)
def test_tile_sides_weigh_the_keys_scored_against_the_rows_gathered(grid, sides, keys):
    """Window 7: on long dims, tiles of 4 score 10 keys per dim where a dim's whole length would be scored; on
    short dims, one tile spans the dim. The tiling built from the choice matches the reference, and a grid spanned
    in every dim needs no gather of its queries."""
    hood = Neighborhood.of((7, 7), (1, 1))
    assert tuple(side.side for side in gathered.tile_sides(grid, hood)) == sides
    geometry = gathered.tiling(grid, hood)
    assert geometry.keys_per_tile == keys
    spanned = sides == grid
    assert np.array_equal(geometry.queries, np.arange(math.prod(grid))) == spanned
    q, k, v, kernel, gain, bias = _inputs(grid, hood.window)
    with torch.no_grad():
        z = gathered.mix(q, k, v, kernel, gain, hood, bias)
        assert rel_err(z, reference_mix(q, k, v, kernel, gain, hood, bias)) <= 1e-12
