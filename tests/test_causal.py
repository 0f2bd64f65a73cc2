"""Causal windows (``causal=``) and NATTEN's border rule (``border='shift'``): the exact reductions, no
look-ahead on every backend, every backend against 'reference' and the brute-force oracle, and bad options.

The Triton kernels run in Triton's CPU interpreter in a fresh process (``test_triton_causal_and_shift``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d, conv_plus

from . import oracle
from .conftest import MODULES, forward_backward, rel_err
from .test_backends import FAST_BACKENDS

TOL = 1e-5
WINDOWED = ["reference", *FAST_BACKENDS]  # every backend that runs here with a finite window, global included


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, E, *S) -> (B, N, E), the grid flattened row-major."""
    return torch.flatten(x, 2).transpose(1, 2)


def _band_blocked(length: int, window: int | None, dilation: int) -> torch.Tensor:
    """(L, L) bool, True where key j is masked for query i: a causal band of ``window`` dilated steps
    (window None: nn.Transformer's causal mask, the strict upper triangle)."""
    if window is None:
        return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    i = torch.arange(length)
    back = i[:, None] - i[None, :]
    return ~((back >= 0) & (back <= (window - 1) * dilation) & (back % dilation == 0))


@pytest.mark.parametrize("bias", [True, False])
def test_global_causal_equals_multihead_attention_with_a_causal_mask(bias):
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=True).eval()
    module = ConvPlus1d.from_attention(mha, window=None, causal=True)
    x = torch.randn(2, 8, 11)
    expected, _ = mha(_flat(x), _flat(x), _flat(x), attn_mask=_band_blocked(11, None, 1), need_weights=False)
    for backend in ("reference", "global", "auto"):
        module.backend = backend
        assert rel_err(_flat(module(x)), expected) <= TOL, backend


@pytest.mark.parametrize(("window", "dilation"), [(3, 1), (3, 2), (5, 3), (1, 1), (15, 1)])
def test_windowed_causal_equals_multihead_attention_with_a_causal_band(window, dilation):
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    module = ConvPlus1d.from_attention(mha, window=window, dilation=dilation, causal=True)
    x = torch.randn(2, 8, 13)
    blocked = _band_blocked(13, window, dilation)
    expected, _ = mha(_flat(x), _flat(x), _flat(x), attn_mask=blocked, need_weights=False)
    for backend in WINDOWED:
        module.backend = backend
        assert rel_err(_flat(module(x)), expected) <= TOL, backend


@pytest.mark.parametrize(
    ("n", "causal", "kernel", "dilation"), [(1, True, 5, 1), (1, True, 3, 2), (2, (True, False), 3, 1)]
)
def test_left_padded_depthwise_conv(n, causal, kernel, dilation):
    """proj=False, g=0, causal: a depthwise conv whose input is zero padded by (k - 1) * dilation before the
    causal dims only (and k // 2 * dilation on both sides of the others)."""
    conv = getattr(nn, f"Conv{n}d")(4, 4, kernel, padding=(kernel // 2) * dilation, dilation=dilation, groups=4)
    module = MODULES[n].from_conv(conv, causal=causal, window=kernel)
    x = torch.randn(2, 4, *(9,) * n)
    flags = (causal,) * n if isinstance(causal, bool) else causal
    padding = []
    for c in reversed(flags):
        padding += [(kernel - 1) * dilation, 0] if c else [(kernel // 2) * dilation] * 2
    expected = getattr(F, f"conv{n}d")(F.pad(x, padding), conv.weight, conv.bias, dilation=dilation, groups=4)
    for backend in WINDOWED:
        module.backend = backend
        assert rel_err(module(x), expected) <= TOL, backend


NATTEN_CASES = [
    # grid, window, dilation, is_causal (NATTEN needs window * dilation <= size)
    ((13,), (5,), (2,), (True,)),
    ((13,), (5,), (2,), (False,)),
    ((12,), (3,), (3,), (False,)),
    ((6, 9), (3, 5), (2, 1), (True, False)),
    ((7, 8), (5, 3), (1, 2), (False, False)),
    ((7, 8), (3, 3), (1, 1), (True, True)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (True, False, False)),
    ((5, 4, 6), (3, 3, 5), (1, 1, 1), (False, True, False)),
]


@pytest.mark.parametrize(("grid", "window", "dilation", "causal"), NATTEN_CASES)
def test_shift_border_and_causal_equal_natten(grid, window, dilation, causal):
    """border='shift' with causal=is_causal is NATTEN's na1d / na2d / na3d, on whole grids, every backend."""
    natten = pytest.importorskip("natten", reason="NATTEN is not installed (make bench installs it)")
    from convplus import backends
    from convplus.neighborhood import Neighborhood

    n = len(grid)
    q, k, v = (torch.randn(2, 2, 8, *grid) for _ in range(3))  # NATTEN on CPU needs head_dim >= 8

    def natten_layout(t):  # (B, K, D, *S) -> (B, *S, K, D)
        return t.permute(0, *range(3, 3 + n), 1, 2).contiguous()

    na = getattr(natten.functional, f"na{n}d")
    out = na(*map(natten_layout, (q, k, v)), kernel_size=window, dilation=dilation, is_causal=causal, scale=1.0)
    expected = out.permute(0, n + 1, n + 2, *range(1, n + 1))  # back to (B, K, D, *S)
    hood = Neighborhood(window, dilation, causal, "shift")
    gain = torch.ones(2)
    for name in WINDOWED:
        z = backends.BACKENDS[name].mix(q, k, v, None, gain, hood)
        assert rel_err(z, expected) <= TOL, name
    if not all(causal):  # the default border is not NATTEN's: the test tells them apart
        clip = backends.BACKENDS["reference"].mix(q, k, v, None, gain, Neighborhood(window, dilation, causal))
        assert rel_err(clip, expected) > 1e-3


# (n, grid, module kwargs): narrow and wide grids, dilation > 1, windows covering the grid, both scores
CASES = [
    (1, (9,), {"window": 3, "kernel_size": 3, "causal": True}),
    (1, (10,), {"window": 5, "kernel_size": 3, "dilation": 2, "causal": True, "score": "qk"}),
    (1, (4,), {"window": 7, "kernel_size": 5, "causal": True}),  # the window covers the grid
    (1, (9,), {"window": 3, "kernel_size": 3, "border": "shift"}),
    (1, (11,), {"window": 5, "kernel_size": 5, "dilation": 2, "border": "shift", "score": "qk"}),
    (1, (3,), {"window": 5, "kernel_size": 3, "border": "shift"}),  # a window wider than the grid
    (2, (5, 6), {"window": 3, "kernel_size": 3, "causal": (True, False), "border": "shift"}),
    (2, (6, 7), {"window": (3, 5), "kernel_size": 3, "dilation": (2, 1), "border": "shift", "score": "qk"}),
    (2, (7, 6), {"window": 3, "kernel_size": 3, "border": "shift", "score": "qk"}),  # shifted rows
    (2, (5, 18), {"window": 3, "kernel_size": 3, "causal": (False, True), "dilation": (1, 2)}),  # wide rows
    (2, (4, 21), {"window": 5, "kernel_size": 5, "border": "shift"}),  # wide rows
    (2, (3, 3), {"window": 5, "kernel_size": 3, "causal": True, "border": "shift"}),
    (3, (4, 3, 5), {"window": 3, "kernel_size": 3, "causal": (True, False, False)}),
    (3, (4, 4, 5), {"window": 3, "kernel_size": 3, "causal": (True, False, False), "border": "shift", "score": "qk"}),
    (1, (9,), {"window": None, "kernel_size": 3, "causal": True}),
    (2, (4, 5), {"window": None, "kernel_size": 3, "causal": (True, False)}),
]


def _module(n: int, kwargs: dict, dtype=torch.float64):
    module = MODULES[n](4, 4, heads=2, dtype=dtype, **kwargs)
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize(("n", "grid", "kwargs"), CASES)
def test_every_backend_matches_reference_and_the_oracle(n, grid, kwargs):
    """Forward and backward (float64) of every backend against 'reference'; 'reference' against the
    brute-force oracle (NATTEN's window start written out, a causal conv padded by hand)."""
    module = _module(n, kwargs)
    x = torch.randn(2, 4, *grid, dtype=torch.float64)
    module.backend = "reference"
    y_ref, g_ref = forward_backward(module, x)
    assert rel_err(y_ref, oracle.conv_plus(module, x)) <= 1e-12
    names = FAST_BACKENDS if kwargs["window"] is not None else ["global"]
    for name in names:
        module.backend = name
        y, grads = forward_backward(module, x)
        assert rel_err(y, y_ref) <= 1e-10, name
        for key, grad in grads.items():
            assert rel_err(grad, g_ref[key]) <= 1e-10, (name, key)


@pytest.mark.parametrize(("n", "grid", "kwargs"), [c for c in CASES if c[2]["window"] is not None][:8])
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "global"])
def test_gradcheck(backend, n, grid, kwargs):
    module = MODULES[n](4, 3, heads=2, head_dim=2, dtype=torch.float64, backend=backend, **kwargs)
    names, params = zip(*module.named_parameters(), strict=True)
    x = torch.randn(1, 4, *grid, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().requires_grad_(True) for p in params]), fast_mode=True)


LOOK_AHEAD = [
    (1, (12,), {"window": 5, "kernel_size": 5, "dilation": 2, "causal": True}),
    (1, (12,), {"window": None, "kernel_size": 3, "causal": True, "score": "qk"}),
    (2, (6, 7), {"window": 3, "kernel_size": 3, "causal": (True, False), "border": "shift"}),
    (3, (5, 3, 4), {"window": 3, "kernel_size": 3, "causal": (True, False, False), "score": "qk"}),
]


def _look_ahead_backends(kwargs: dict) -> list[str]:
    return WINDOWED if kwargs["window"] is not None else ["reference", "global"]


@pytest.mark.parametrize(("n", "grid", "kwargs"), LOOK_AHEAD)
def test_no_output_depends_on_a_later_input(n, grid, kwargs):
    """Along the first (causal) dim: changing the input after position t leaves every output at t and before
    bit for bit unchanged, and changes outputs after t."""
    module = _module(n, kwargs, torch.float32)
    x = torch.randn(2, 4, *grid)
    for backend in _look_ahead_backends(kwargs):
        module.backend = backend
        with torch.no_grad():
            y = module(x)
            for t in range(grid[0] - 1):
                changed = x.clone()
                changed[:, :, t + 1 :] = torch.randn_like(changed[:, :, t + 1 :])
                y_changed = module(changed)
                assert torch.equal(y_changed[:, :, : t + 1], y[:, :, : t + 1]), (backend, t)
                assert not torch.allclose(y_changed[:, :, t + 1 :], y[:, :, t + 1 :]), (backend, t)


TRITON_CHECK = r"""
import torch
from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d
from convplus import backends
from convplus.neighborhood import Neighborhood
MODULES = {1: ConvPlus1d, 2: ConvPlus2d, 3: ConvPlus3d}
CASES = %(cases)r
LOOK_AHEAD = %(look_ahead)r
NATTEN = %(natten)r
torch.manual_seed(0)
for n, grid, kwargs in CASES:
    if kwargs["window"] is None:
        continue
    module = MODULES[n](4, 4, heads=2, **kwargs)
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, *grid)
    upstream = torch.randn(2, 4, *grid)
    results = []
    for backend in ("reference", "triton"):
        module.backend = backend
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (y * upstream).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in module.parameters()])
        module.zero_grad(set_to_none=True)
    for name, got, want in zip(["y", "x", *dict(module.named_parameters())], results[1], results[0]):
        error = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)
        # the temperature's gradient sums every score of its head: 8 times the bound, as in test_triton
        assert error <= 1e-5 * (8 if name == "log_temperature" else 1), (grid, kwargs, name, error)
for n, grid, kwargs in LOOK_AHEAD:
    if kwargs["window"] is None:
        continue
    module = MODULES[n](4, 4, heads=2, backend="triton", **kwargs)
    x = torch.randn(2, 4, *grid)
    with torch.no_grad():
        y = module(x)
        for t in (0, grid[0] // 2, grid[0] - 2):  # a few cut points: the interpreter is slow
            changed = x.clone()
            changed[:, :, t + 1 :] = torch.randn_like(changed[:, :, t + 1 :])
            assert torch.equal(module(changed)[:, :, : t + 1], y[:, :, : t + 1]), (grid, kwargs, t)
for grid, window, dilation, causal in NATTEN:
    q, k, v = (torch.randn(2, 2, 8, *grid) for _ in range(3))
    hood = Neighborhood(window, dilation, causal, "shift")
    want = backends.BACKENDS["reference"].mix(q, k, v, None, torch.ones(2), hood)
    got = backends.BACKENDS["triton"].mix(q, k, v, None, torch.ones(2), hood)
    assert (got - want).abs().max().item() <= 1e-5, (grid, window, dilation, causal)
print("triton ok")
"""


def test_triton_causal_and_shift():
    """The Triton kernels in the interpreter: forward and backward against 'reference' on every windowed case,
    no look-ahead, and NATTEN's neighborhoods (whose 'reference' the NATTEN test checks)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    # a subset, the interpreter being slow: causal dilated, shifted dilated, both in 2-d, shifted rows, 3-d
    # causal in time with shifted space
    cases = [CASES[i] for i in (1, 4, 6, 8, 13)]
    natten = [NATTEN_CASES[i] for i in (0, 3, 6)]
    script = TRITON_CHECK % {"cases": cases, "look_ahead": LOOK_AHEAD, "natten": natten}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok" in result.stdout


def test_three_d_causal_in_time_sees_past_frames_whole_window():
    """causal=(True, False, False): a query sees its own and the window - 1 earlier frames, each through the
    spatial window centred on it; checked on the attention weights against the brute-force mask."""
    module = ConvPlus3d(4, 4, heads=2, kernel_size=3, window=3, causal=(True, False, False))
    probs = module.attention_probs(torch.randn(1, 4, 4, 3, 3))
    blocked = oracle.neighborhood_blocked((4, 3, 3), (3, 3, 3), (1, 1, 1), (True, False, False))
    assert torch.equal(probs[0, 0] == 0, blocked)
    # the centre of frame 2 sees frames 0..2, 9 points each
    assert int((~blocked[2 * 9 + 4]).sum()) == 27


def test_bad_causal_and_border_are_refused_before_any_compute():
    with pytest.raises(ValueError, match=r"causal must be a bool or a sequence of 2 bools.*\(True,\)"):
        ConvPlus2d(4, causal=(True,))
    with pytest.raises(ValueError, match=r"causal must be.*got 1"):
        ConvPlus1d(4, causal=1)
    with pytest.raises(ValueError, match=r"border must be one of 'clip', 'shift', got 'wrap'"):
        ConvPlus2d(4, border="wrap")
    x = torch.randn(1, 4, 5)
    common = {"heads": 2, "kernel": None, "gain": torch.ones(2), "window": (3,), "dilation": (1,)}
    with pytest.raises(ValueError, match=r"causal must be a bool or a sequence of 1 bools"):
        conv_plus(x, causal=(True, False), temperature=torch.ones(2), **common)
    with pytest.raises(ValueError, match=r"border must be one of"):
        conv_plus(x, border="same", temperature=torch.ones(2), **common)


def test_options_show_in_repr_and_survive_a_copy():
    module = ConvPlus2d(4, causal=(True, False), border="shift")
    assert "causal=(True, False)" in repr(module) and "border='shift'" in repr(module)
    assert copy.deepcopy(module).neighborhood == module.neighborhood
    assert "causal" not in repr(ConvPlus2d(4)) and "border" not in repr(ConvPlus2d(4))


def test_auto_never_picks_a_backend_that_cannot_run_the_neighborhood():
    """window=None with a causal dim needs a mask, which only the dense backends take: 'auto' picks 'global';
    a causal window that spans the grid still masks the future, so it is not treated as global."""
    from convplus import backends
    from convplus.neighborhood import Neighborhood

    cpu = torch.device("cpu")
    assert backends.select((50,), cpu, Neighborhood.of(None, (1,), (True,))) == "global"
    assert not Neighborhood.of((7,), (1,), (True,)).covers_grid((4,))
    assert Neighborhood.of((7,), (1,), (False,), "shift").covers_grid((4,))
    if "cpu" in FAST_BACKENDS:
        assert backends.select((4,), cpu, Neighborhood.of((7,), (1,), (True,))) == "cpu"
    with pytest.raises(ValueError, match="needs a finite window"):
        backends.resolve("local", (9,), cpu, Neighborhood.of(None, (1,), (True,)))


def test_the_offsets_of_a_pass_are_exactly_the_union_of_the_windows():
    """The fused passes loop over ``offset_ranges`` (a closed form): every offset a window uses, and none that
    no window uses, for every mode, size, window and dilation up to 9."""
    from convplus.neighborhood import Neighborhood, dim_bounds, offset_ranges

    for size in range(1, 10):
        for window in (1, 3, 5, 7, 9):
            for dilation in (1, 2, 3):
                for causal, border in ((False, "clip"), (False, "shift"), (True, "clip")):
                    bounds = dim_bounds(size, window, dilation, causal, border).tolist()
                    used = {o for lo, hi in bounds for o in range(lo, hi + 1, dilation)}
                    hood = Neighborhood((window,), (dilation,), (causal,), border)
                    assert list(offset_ranges((size,), hood)[0]) == sorted(used), (size, window, dilation, border)
