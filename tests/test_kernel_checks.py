"""The C++ CPU kernel's entry points refuse bad arguments with a RuntimeError that names the entry point, the
argument, what was expected and what was given, before touching any data."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from convplus.backends.cpu import extension, unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason(torch.device("cpu")) is not None, reason="the C++ kernel does not build here"
)

B, K, DQ, D, T, H, X = 2, 2, 3, 4, 1, 5, 6  # batch 2, K = 2 heads; a 1 x 5 x 6 grid
N = T * H * X
OFFSETS = [(0, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # a 3 x 3 window: W = 9
W = len(OFFSETS)
# per coordinate of t, y, x: the first and last offset of its (clipped) window
BOUNDS = [(0, 0)] + [(max(-1, -c), min(1, size - 1 - c)) for size in (H, X) for c in range(size)]

# The positional arguments of each entry point, in call order; save_probs and with_pos are flags, not tensors.
SIGNATURES = {
    "window_mix_forward": ("q", "k", "v", "gain", "kernel", "tap_index", "offsets", "bounds", "bias", "save_probs"),
    "direct_window_mix_forward": (
        "features",
        "pos",
        "temperature",
        "v",
        "gain",
        "kernel",
        "tap_index",
        "offsets",
        "bounds",
        "bias",
        "save_probs",
    ),
    "window_mix_backward": ("q", "k", "v", "gain", "kernel", "tap_index", "probs", "gout", "offsets"),
    "direct_score_forward": ("x", "pos", "temperature"),
    "direct_score_backward": ("gq", "gk", "k", "inverse_norm", "temperature", "x", "with_pos"),
}
FLAGS = ("save_probs", "with_pos")
ANY_STRIDES = {
    "window_mix_forward": ("q", "k", "v"),
    "direct_window_mix_forward": ("features", "v"),
    "window_mix_backward": ("q", "k", "v", "gout"),
    "direct_score_forward": ("x",),
    "direct_score_backward": ("x",),
}
"""The arguments each entry point reads in any layout (channels-last, broadcast): the others must be contiguous."""
MATCHING_OUTPUT = {
    "window_mix_forward": {"v": 0},
    "direct_window_mix_forward": {"v": 0},
    "window_mix_backward": {"q": 0, "k": 1, "v": 2},
    "direct_score_forward": {},
    "direct_score_backward": {"x": 0},
}
"""entry -> strided argument -> the index of an output made in its layout (z like v; dq, dk, dv like q, k, v; dx
like x)."""


def _call(entry: str, arguments: dict) -> list[torch.Tensor]:
    return getattr(extension(), entry)(*(arguments[name] for name in SIGNATURES[entry]))


def _window(dtype: torch.dtype, optional: bool) -> dict:
    """v, gain, the convolution kernel with its tap_index, offsets, bounds and bias (kernel and bias empty
    unless ``optional``)."""
    v = torch.randn(B, K, D, T, H, X, dtype=dtype)
    return {
        "v": v,
        "gain": torch.rand(K, dtype=dtype),
        "kernel": torch.randn(K, D, W, dtype=dtype) if optional else v.new_zeros(0),
        "tap_index": torch.arange(W) if optional else torch.zeros(0, dtype=torch.int64),
        "offsets": torch.tensor(OFFSETS),
        "bounds": torch.tensor(BOUNDS),
        "bias": torch.randn(K, D, dtype=dtype) if optional else v.new_zeros(0),
    }


def _window_mix_forward(dtype: torch.dtype, optional: bool) -> dict:
    q = torch.randn(B, K, DQ, T, H, X, dtype=dtype)
    return {"q": q, "k": torch.randn_like(q), **_window(dtype, optional), "save_probs": True}


def _direct_window_mix_forward(dtype: torch.dtype, optional: bool) -> dict:
    return {
        "features": torch.randn(B, K, DQ, T, H, X, dtype=dtype),
        "pos": torch.randn(K, DQ, N, dtype=dtype) if optional else torch.zeros(0, dtype=dtype),
        "temperature": torch.rand(K, dtype=dtype) + 0.5,
        **_window(dtype, optional),
        "save_probs": True,
    }


def _window_mix_backward(dtype: torch.dtype, optional: bool) -> dict:
    arguments = _window_mix_forward(dtype, optional)
    out, probs = _call("window_mix_forward", arguments)
    return {**arguments, "probs": probs, "gout": torch.randn_like(out)}


def _direct_score_forward(dtype: torch.dtype, optional: bool) -> dict:
    return {
        "x": torch.randn(B, K, DQ, N, dtype=dtype),
        "pos": torch.randn(K, DQ, N, dtype=dtype) if optional else torch.zeros(0, dtype=dtype),
        "temperature": torch.rand(K, dtype=dtype) + 0.5,
    }


def _direct_score_backward(dtype: torch.dtype, optional: bool) -> dict:
    arguments = _direct_score_forward(dtype, optional)
    q, k, inverse_norm = _call("direct_score_forward", arguments)
    return {
        "gq": torch.randn_like(q),
        "gk": torch.randn_like(k),
        "k": k,
        "inverse_norm": inverse_norm,
        "temperature": arguments["temperature"],
        "x": arguments["x"],
        "with_pos": optional,
    }


VALID = {
    "window_mix_forward": _window_mix_forward,
    "direct_window_mix_forward": _direct_window_mix_forward,
    "window_mix_backward": _window_mix_backward,
    "direct_score_forward": _direct_score_forward,
    "direct_score_backward": _direct_score_backward,
}
TENSOR_ARGUMENTS = [(entry, name) for entry, names in SIGNATURES.items() for name in names if name not in FLAGS]
CONTIGUOUS_ARGUMENTS = [(entry, name) for entry, name in TENSOR_ARGUMENTS if name not in ANY_STRIDES.get(entry, ())]


def _refused(entry: str, name: str, value, message: str) -> None:
    """Calls entry with valid float64 arguments but name = value(valid) and expects a RuntimeError whose message
    contains "<entry>: <message>"."""
    arguments = VALID[entry](torch.float64, True)
    arguments[name] = value(arguments[name])
    with pytest.raises(RuntimeError, match=re.escape(f"{entry}: {message}")):
        _call(entry, arguments)


@pytest.mark.parametrize("entry", SIGNATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optional", [True, False], ids=["with_optional", "without_optional"])
def test_valid_arguments_run(entry, dtype, optional):
    outputs = _call(entry, VALID[entry](dtype, optional))
    assert all(torch.isfinite(out).all() for out in outputs)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values and shape, not contiguous."""
    return torch.stack([t, t], dim=-1)[..., 0]


@pytest.mark.parametrize(("entry", "name"), TENSOR_ARGUMENTS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda t: t.to("meta"), "must be a dense CPU tensor, got a Strided tensor on meta"),
        (lambda t: t.to(torch.int32), "must have dtype"),
    ],
    ids=["device", "dtype"],
)
def test_every_tensor_argument_is_a_cpu_tensor_of_the_right_dtype(entry, name, value, message):
    _refused(entry, name, value, f"{name} {message}")


@pytest.mark.parametrize(("entry", "name"), CONTIGUOUS_ARGUMENTS)
def test_tensor_arguments_outside_the_strided_ones_must_be_contiguous(entry, name):
    _refused(entry, name, _strided, f"{name} must be contiguous")


@pytest.mark.parametrize(("entry", "name"), [(entry, name) for entry, names in ANY_STRIDES.items() for name in names])
def test_strided_arguments_give_what_their_contiguous_copies_give(entry, name):
    """The tensors of the activations (q, k, features, v, gout; x and the score gradients) are read in any layout:
    a non-contiguous one (every other entry of a wider tensor) or channels-last (channels innermost) gives the
    outputs of its contiguous copy, and outputs are made in the layout of the input they match."""
    arguments = VALID[entry](torch.float64, True)
    expected = _call(entry, arguments)
    channels_last = arguments[name].movedim(2, -1).contiguous().movedim(-1, 2)
    for layout in (_strided(arguments[name]), channels_last):
        outputs = _call(entry, {**arguments, name: layout})
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    matching = MATCHING_OUTPUT[entry].get(name)
    if matching is not None:
        assert outputs[matching].stride() == channels_last.stride()


def _mix_cases(entry: str, query: str) -> list[tuple[str, str, Callable, str]]:
    """The shape and value cases shared by the three windowed-mix entry points; query: q or features."""
    return [
        (
            entry,
            query,
            lambda t: t[0],
            f"{query} must be a 6-d tensor (B, K, Dq, T, H, X), got shape [{K}, {DQ}, {T}, ",
        ),
        (
            entry,
            query,
            lambda t: t[..., :-1].contiguous(),
            f"{query} must have shape (B, K, Dq, T, H, X) = [2, 2, 3, 1, 5, 6], got [2, 2, 3, 1, 5, 5]",
        ),
        (entry, "v", lambda t: t[0], "v must be a 6-d tensor (B, K, D, T, H, X)"),
        (entry, "gain", lambda t: t.view(K, 1), "gain must have shape (K,) = [2], got [2, 1]"),
        (entry, "gain", lambda t: torch.ones(3, dtype=t.dtype), "gain must have shape (K,) = [2], got [3]"),
        (entry, "gain", lambda t: t[:0], "gain must have shape (K,) = [2], got [0]"),
        (entry, "kernel", lambda t: t[0], "kernel must be a 3-d tensor (K, D, P) or empty"),
        (entry, "kernel", lambda t: t[:, 1:].contiguous(), f"kernel must have shape (K, D, P) = [2, {D}, {W}]"),
        (entry, "kernel", lambda t: t[:0], "tap_index must have shape (0,) as kernel is empty, got [9]"),
        (entry, "tap_index", lambda t: t[1:], f"tap_index must have shape (W,) = [{W}], got [{W - 1}]"),
        (entry, "tap_index", lambda t: t.view(1, -1), "tap_index must be a 1-d tensor (W,)"),
        (entry, "tap_index", lambda t: t + 1, f"tap_index must hold kernel entries in [-1, P = {W}), got {W}"),
        (entry, "tap_index", lambda t: t - 2, "tap_index must hold kernel entries in [-1, P = 9), got -2"),
        (entry, "offsets", lambda t: t[:, 1:].contiguous(), "offsets must have shape (W, 3) with W >= 1, got [9, 2]"),
        (entry, "offsets", lambda t: t[:0], "offsets must have shape (W, 3) with W >= 1, got [0, 3]"),
        (entry, "offsets", lambda t: t.flatten(), "offsets must be a 2-d tensor (W, 3)"),
        (entry, "offsets", lambda t: t * torch.tensor([1, 1, X]), "offsets must lie inside the grid"),
        (entry, "offsets", lambda t: t + torch.tensor([T, 0, 0]), "offsets must lie inside the grid"),
        (entry, "offsets", lambda t: t + torch.tensor([0, 2, 0]), "offsets must include the query's own row"),
    ] + (
        [
            (entry, "bias", lambda t: t[:, 1:].contiguous(), f"bias must have shape (K, D) = [2, {D}]"),
            (
                entry,
                "bounds",
                lambda t: t[1:],
                f"bounds must have shape (T + H + X, 2) = [{T + H + X}, 2], got [11, 2]",
            ),
            (entry, "bounds", lambda t: t + 1, "bounds must hold a window lo <= 0 <= hi inside the grid at every"),
            (
                entry,
                "bounds",
                lambda t: torch.cat([t[:1], t[1:2] - 1, t[2:]]),
                "bounds must hold a window lo <= 0 <= hi inside the grid at every coordinate, got bounds[1] = (-1, 0)",
            ),
        ]
        if entry != "window_mix_backward"
        else []
    )


SHAPE_CASES = [
    *_mix_cases("window_mix_forward", "q"),
    ("window_mix_forward", "k", lambda t: t[:, 1:].contiguous(), "k must have shape (B, K, Dq, T, H, X) = [2, 2, 3"),
    *_mix_cases("direct_window_mix_forward", "features"),
    (
        "direct_window_mix_forward",
        "pos",
        lambda t: t[..., 1:].contiguous(),
        "pos must have shape (K, Dq, N) = [2, 3, 30]",
    ),
    ("direct_window_mix_forward", "temperature", lambda t: t[:1], "temperature must have shape (K,) = [2], got [1]"),
    *_mix_cases("window_mix_backward", "q"),
    ("window_mix_backward", "k", lambda t: t[:1], "k must have shape (B, K, Dq, T, H, X) = [2, 2, 3, 1, 5, 6], got [1"),
    ("window_mix_backward", "probs", lambda t: t[:0], "probs must have shape (BK*T*H, W, Xr) = [20, 9, 8], got [0,"),
    ("window_mix_backward", "probs", lambda t: t[..., :-1].contiguous(), "probs must have shape (BK*T*H, W, Xr)"),
    ("window_mix_backward", "gout", lambda t: t[:, 1:].contiguous(), "gout must have shape (B, K, D, T, H, X) = [2, 2"),
    ("direct_score_forward", "x", lambda t: t[0], "x must be a 4-d tensor (B, K, D, N), got shape [2, 3, 30]"),
    ("direct_score_forward", "pos", lambda t: t[:, 1:].contiguous(), "pos must have shape (K, D, N) = [2, 3, 30]"),
    ("direct_score_forward", "temperature", lambda t: t.repeat(2), "temperature must have shape (K,) = [2], got [4]"),
    ("direct_score_backward", "k", lambda t: t[0], "k must be a 4-d tensor (B, K, D, N)"),
    ("direct_score_backward", "gq", lambda t: t[..., 1:].contiguous(), "gq must have shape (B, K, D, N) = [2, 2, 3,"),
    ("direct_score_backward", "gk", lambda t: t[:1], "gk must have shape (B, K, D, N) = [2, 2, 3, 30], got [1,"),
    ("direct_score_backward", "inverse_norm", lambda t: t[0], "inverse_norm must have shape (B, K, N) = [2, 2, 30]"),
    ("direct_score_backward", "temperature", lambda t: t[:1], "temperature must have shape (K,) = [2], got [1]"),
    ("direct_score_backward", "x", lambda t: t[:, :1], "x must have shape (B, K, D, N) = [2, 2, 3, 30], got [2, 1,"),
]


@pytest.mark.parametrize(("entry", "name", "value", "message"), SHAPE_CASES)
def test_shapes_and_values_are_checked(entry, name, value, message):
    _refused(entry, name, value, message)
