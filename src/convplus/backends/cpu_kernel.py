"""The 'cpu' backend: the windowed mixing step in one fused C++ kernel, forward and backward: the attention
term, its gain and the depthwise convolution term in a single pass over the window,
z_i = sum_w (g * P_w(i) + r(o_w)) * v_{i + o_w}. Parallel over rows, SIMD register tiles over the contiguous
width; compiled with the system's C++ compiler on first use (``torch.utils.cpp_extension``, cached afterwards).

It computes what the 'local' backend computes. Under ``torch.compile`` / ``torch.export`` (which cannot trace
into the kernel) and for dtypes other than float32/float64 it runs the 'local' PyTorch loop instead; a
convolution kernel that reaches past the attention window runs as a separate depthwise conv.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from ..neighborhood import kernel_tap_index, reachable_halves, window_offsets
from . import local
from .terms import convolution_term, with_convolution_term

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("bindings.cpp", "window_mix.cpp", "direct_score.cpp")]
KERNEL_DTYPES = (torch.float32, torch.float64)


@functools.cache
def extension() -> ModuleType:
    """The compiled kernel module (built on first call; raises if no C++ toolchain can build it)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="convplus_cpu_kernels",
        sources=[str(source) for source in SOURCES],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used on this machine, or None if it builds and loads."""
    try:
        extension()
    except Exception as error:  # any build or load failure: report it, the 'local' backend still works
        return f"the C++ kernel could not be built ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


class _WindowMix(torch.autograd.Function):
    """q, k (BK, Dq, T, H, X), v (BK, D, T, H, X), gain (K,), kernel (K, D, P) or empty, tap_index (W,),
    offsets (W, 3) -> z (BK, D, T, H, X). The probabilities are kept for backward only when ``differentiable``
    (inside ``forward``, grad mode is always off and ``needs_input_grad`` ignores ``torch.no_grad``)."""

    @staticmethod
    def forward(ctx, q, k, v, gain, kernel, tap_index, offsets, differentiable):
        save = differentiable and any(ctx.needs_input_grad)
        out, probs = extension().window_mix_forward(q, k, v, gain, kernel, tap_index, offsets, save)
        ctx.save_for_backward(q, k, v, gain, kernel, tap_index, probs, offsets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gain, kernel, tap_index, probs, offsets = ctx.saved_tensors
        dq, dk, dv, dgain, dkernel = extension().window_mix_backward(
            q, k, v, gain, kernel, tap_index, probs, grad_out.contiguous(), offsets
        )
        return dq, dk, dv, dgain, dkernel if kernel.numel() else None, None, None, None


class _DirectScore(torch.autograd.Function):
    """x (B, K, D, N), pos (K, D, N) or empty, temperature (K,) -> q = tau * k, k = unit(x + pos)."""

    @staticmethod
    def forward(ctx, x, pos, temperature):
        q, k, inverse_norm = extension().direct_score_forward(x, pos, temperature)
        ctx.save_for_backward(k, inverse_norm, temperature)
        ctx.with_pos = pos.numel() > 0
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        k, inverse_norm, temperature = ctx.saved_tensors
        grad_q = torch.zeros_like(k) if grad_q is None else grad_q.contiguous()
        grad_k = torch.zeros_like(k) if grad_k is None else grad_k.contiguous()
        dx, dpos, dtemperature = extension().direct_score_backward(
            grad_q, grad_k, k, inverse_norm, temperature, ctx.with_pos
        )
        return dx, dpos if ctx.with_pos else None, dtemperature


def direct_score_features(
    x: torch.Tensor, heads: int, pos: torch.Tensor | None, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 'direct' score features of ``convplus.functional.score_features`` in one fused pass (forward and
    backward): x (B, C, *S), pos (C, *S) or None, temperature (K,) -> q, k (B, K, C/K, *S); None where the
    kernel does not run (not CPU, another dtype, under torch.compile)."""
    if x.device.type != "cpu" or not _runs_here(x, x) or unavailable_reason() is not None:
        return None
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    flat = x.reshape(batch, heads, channels // heads, -1).contiguous()
    pos = x.new_zeros(0) if pos is None else pos.to(x.dtype).reshape(heads, channels // heads, -1).contiguous()
    q, k = _DirectScore.apply(flat, pos, temperature.to(x.dtype))
    shape = (batch, heads, channels // heads, *spatial)
    return q.view(shape), k.view(shape)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(B, K, C, *S) with 1 <= len(S) <= 3 -> contiguous (B*K, C, T, H, X)."""
    spatial = t.shape[3:]
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], *([1] * (3 - len(spatial))), *spatial).contiguous()


@functools.lru_cache(maxsize=256)
def _window(
    spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The clipped window on this grid: its reachable halves and its offsets as a (W, 3) int64 tensor (n-d
    offsets padded to 3 dims at the front)."""
    halves = reachable_halves(spatial, window, dilation)
    offsets = [(0,) * (3 - len(o)) + o for o in window_offsets(halves, dilation)]
    return halves, torch.tensor(offsets, dtype=torch.int64)


@functools.lru_cache(maxsize=256)
def _tap_index(
    spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...], kernel_size: tuple[int, ...]
) -> torch.Tensor | None:
    """``neighborhood.kernel_tap_index`` as a (W,) int64 tensor (cached), or None."""
    index = kernel_tap_index(spatial, window, dilation, kernel_size)
    return None if index is None else torch.tensor(index, dtype=torch.int64)


def _window_mix(q, k, v, gain, kernel, tap_index, offsets) -> torch.Tensor:
    """The kernel on (B, K, C, *S) tensors; kernel None: attention term only."""
    kernel = v.new_zeros(0) if kernel is None else kernel.to(v.dtype).flatten(2).contiguous()
    tap_index = offsets.new_zeros(0) if tap_index is None else tap_index
    inputs = (_as_3d(q), _as_3d(k), _as_3d(v), gain.to(v.dtype), kernel, tap_index, offsets)
    out = _WindowMix.apply(*inputs, torch.is_grad_enabled())
    return out.view(v.shape)


def _runs_here(q: torch.Tensor, v: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and v.dtype in KERNEL_DTYPES and q.dtype == v.dtype


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> torch.Tensor:
    """The attention term alone, sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    if not _runs_here(q, v):
        return local.attend(q, k, v, window, dilation)
    _, offsets = _window(tuple(v.shape[3:]), window, dilation)
    return _window_mix(q, k, v, v.new_ones(v.shape[1]), None, None, offsets)


_unfused = with_convolution_term(local.attend)


def mix(q, k, v, kernel, gain, window, dilation) -> torch.Tensor:
    """z = g * attention term + depthwise conv term in one kernel; see convplus.backends for the signature."""
    if gain is None or not _runs_here(q, v):
        return _unfused(q, k, v, kernel, gain, window, dilation)
    spatial = tuple(v.shape[3:])
    _, offsets = _window(spatial, window, dilation)
    tap_index = None if kernel is None else _tap_index(spatial, window, dilation, tuple(kernel.shape[2:]))
    if kernel is not None and tap_index is None:  # the kernel reaches past the window: a separate conv term
        return _window_mix(q, k, v, gain, None, None, offsets) + convolution_term(v, kernel, dilation)
    return _window_mix(q, k, v, gain, kernel, tap_index, offsets)
