"""The 'cpu' backend: the windowed mixing step in one fused C++ kernel, forward and backward: the attention
term, its gain and the depthwise convolution term in a single pass over the window,
z_i = sum_w (g * P_w(i) + r(o_w)) * v_{i + o_w} (+ bias). Parallel over rows, SIMD register tiles over the
contiguous width; compiled with the system's C++ compiler on first use (``torch.utils.cpp_extension``, cached
afterwards). With the 'direct' score (``direct_mix``) the pass computes the unit keys and the queries itself from
the input features, so they are never written to memory; backward recomputes them in one pass.

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


def _bias_grad(grad_out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """The gradient of the bias (K, D) (None if empty) from grad_out (BK, D, T, H, X)."""
    if not bias.numel():
        return None
    return grad_out.reshape(-1, *bias.shape, grad_out[0, 0].numel()).sum(dim=(0, 3))


class _WindowMix(torch.autograd.Function):
    """q, k (BK, Dq, T, H, X), v (BK, D, T, H, X), gain (K,), kernel (K, D, P) or empty, tap_index (W,),
    offsets (W, 3), bias (K, D) or empty -> z (BK, D, T, H, X). The probabilities are kept for backward only
    when ``differentiable`` (inside ``forward``, grad mode is always off and ``needs_input_grad`` ignores
    ``torch.no_grad``)."""

    @staticmethod
    def forward(ctx, q, k, v, gain, kernel, tap_index, offsets, bias, differentiable):
        save = differentiable and any(ctx.needs_input_grad)
        out, probs = extension().window_mix_forward(q, k, v, gain, kernel, tap_index, offsets, bias, save)
        ctx.save_for_backward(q, k, v, gain, kernel, tap_index, probs, offsets, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gain, kernel, tap_index, probs, offsets, bias = ctx.saved_tensors
        dq, dk, dv, dgain, dkernel = extension().window_mix_backward(
            q, k, v, gain, kernel, tap_index, probs, grad_out.contiguous(), offsets
        )
        dkernel = dkernel if kernel.numel() else None
        return dq, dk, dv, dgain, dkernel, None, None, _bias_grad(grad_out, bias), None


class _DirectWindowMix(torch.autograd.Function):
    """_WindowMix with the 'direct' score computed inside the forward pass: features (BK, Dq, T, H, X), pos
    (K, Dq, N) or empty and temperature (K,) give k = unit(features + pos) per head and q = tau * k, which are
    never written out. Backward recomputes q and k in one pass instead of keeping them."""

    @staticmethod
    def forward(ctx, features, pos, temperature, v, gain, kernel, tap_index, offsets, bias, differentiable):
        save = differentiable and any(ctx.needs_input_grad)
        out, probs = extension().direct_window_mix_forward(
            features, pos, temperature, v, gain, kernel, tap_index, offsets, bias, save
        )
        ctx.save_for_backward(features, pos, temperature, v, gain, kernel, tap_index, probs, offsets, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, pos, temperature, v, gain, kernel, tap_index, probs, offsets, bias = ctx.saved_tensors
        kernels = extension()
        flat = features.view(-1, temperature.numel(), features.shape[1], features[0, 0].numel())  # (B, K, Dq, N)
        q, k, inverse_norm = kernels.direct_score_forward(flat, pos, temperature)
        dq, dk, dv, dgain, dkernel = kernels.window_mix_backward(
            q.view_as(features), k.view_as(features), v, gain, kernel, tap_index, probs, grad_out.contiguous(), offsets
        )
        with_pos = pos.numel() > 0
        dx, dpos, dtemperature = kernels.direct_score_backward(
            dq.view_as(flat), dk.view_as(flat), k, inverse_norm, temperature, with_pos
        )
        return (
            dx.view_as(features),
            dpos if with_pos else None,
            dtemperature,
            dv,
            dgain,
            dkernel if kernel.numel() else None,
            None,
            None,
            _bias_grad(grad_out, bias),
            None,
        )


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


def _kernel_arguments(
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor,
    window: tuple[int, ...],
    dilation: tuple[int, ...],
    bias: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The kernel's (v, gain, kernel, tap_index, offsets, bias) arguments for v (B, K, D, *S), and the
    convolution kernel to run apart as a depthwise conv (one that reaches past the window), or None."""
    spatial = tuple(v.shape[3:])
    _, offsets = _window(spatial, window, dilation)
    tap_index = None if kernel is None else _tap_index(spatial, window, dilation, tuple(kernel.shape[2:]))
    apart = kernel if tap_index is None else None
    fused = v.new_zeros(0) if tap_index is None else kernel.to(v.dtype).flatten(2).contiguous()
    taps = offsets.new_zeros(0) if tap_index is None else tap_index
    bias = v.new_zeros(0) if bias is None else bias.to(v.dtype).contiguous()
    return (_as_3d(v), gain.to(v.dtype), fused, taps, offsets, bias), apart


def _with_apart(z: torch.Tensor, v: torch.Tensor, apart: torch.Tensor | None, dilation: tuple[int, ...]):
    """z (BK, D, T, H, X) as (B, K, D, *S), plus the convolution term run apart, if any."""
    z = z.view(v.shape)
    return z if apart is None else z + convolution_term(v, apart, dilation)


def runs_here(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (float32/float64, one dtype, not under torch.compile)."""
    return not torch.compiler.is_compiling() and v.dtype in KERNEL_DTYPES and q.dtype == v.dtype


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> torch.Tensor:
    """The attention term alone, sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    if not runs_here(q, v):
        return local.attend(q, k, v, window, dilation)
    return mix(q, k, v, None, v.new_ones(v.shape[1]), window, dilation)


_unfused = with_convolution_term(local.attend)


def mix(q, k, v, kernel, gain, window, dilation, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias in one kernel; see convplus.backends for the
    signature."""
    if gain is None or not runs_here(q, v):
        return _unfused(q, k, v, kernel, gain, window, dilation, bias)
    arguments, apart = _kernel_arguments(v, kernel, gain, window, dilation, bias)
    z = _WindowMix.apply(_as_3d(q), _as_3d(k), *arguments, torch.is_grad_enabled())
    return _with_apart(z, v, apart, dilation)


def direct_mix(
    x: torch.Tensor,
    pos: torch.Tensor | None,
    temperature: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor,
    window: tuple[int, ...],
    dilation: tuple[int, ...],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mix`` with the 'direct' score computed inside the kernel: the z that
    ``functional.score_features(x, K, 'direct', pos, temperature)`` followed by ``mix`` gives, without writing q
    and k. x (B, C, *S) with C = K * Dq, pos (C, *S) or None, temperature (K,), v (B, K, D, *S);
    needs ``runs_here(x, v)``."""
    heads = v.shape[1]
    features = _as_3d(x.reshape(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:]))
    pos = x.new_zeros(0) if pos is None else pos.to(x.dtype).reshape(heads, x.shape[1] // heads, -1).contiguous()
    arguments, apart = _kernel_arguments(v, kernel, gain, window, dilation, bias)
    z = _DirectWindowMix.apply(features, pos, temperature.to(x.dtype), *arguments, torch.is_grad_enabled())
    return _with_apart(z, v, apart, dilation)
