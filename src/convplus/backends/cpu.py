"""The 'cpu' backend: the windowed mixing step in one fused C++ kernel, forward and backward: the attention
term, its gain and the depthwise convolution term in a single pass over the window,
z_i = sum_w (g * P_w(i) + r(o_w)) * v_{i + o_w} (+ bias). Parallel over rows, SIMD register tiles over the
contiguous width. An installed package carries the kernel compiled at install time
(``convplus.backends._cpu_kernels``); a source checkout that was never built compiles it with the system's C++
compiler on first use instead (``torch.utils.cpp_extension``, cached afterwards). With the 'direct' score
(``direct_mix``) the pass computes the unit keys and the queries itself from the input features, so they are
never written to memory; backward recomputes them in one pass.

It computes what the 'local' backend computes. Under ``torch.compile`` / ``torch.export`` (which cannot trace
into the kernel) and for dtypes other than float32/float64 it runs the 'local' PyTorch loop instead; a
convolution kernel that reaches past the attention window runs as a separate depthwise conv.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from types import ModuleType

import torch

from ..neighborhood import Neighborhood
from . import cpu_build, local
from .fused_window import FusedWindow, fused_window
from .terms import direct_score, with_convolution_term

KERNEL_DTYPES = (torch.float32, torch.float64)


def _build_just_in_time() -> ModuleType:
    """The kernel compiled now (or taken from the TORCH_EXTENSIONS_DIR cache) with torch.utils.cpp_extension."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on machines without a GPU
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension.load(
        name=cpu_build.JIT_NAME,
        sources=[str(source) for source in cpu_build.sources()],
        extra_cflags=list(cpu_build.EXTRA_CFLAGS),
        extra_ldflags=list(cpu_build.EXTRA_LDFLAGS),
        verbose=False,
    )


@functools.cache
def _load() -> ModuleType | str:
    """The kernel module: the one compiled at install time, else one built just in time; or, as a string, why
    neither can be had. Tried once per process: a failed build is not retried on every call."""
    try:
        return importlib.import_module(cpu_build.MODULE)
    except ImportError as error:
        installed = None if isinstance(error, ModuleNotFoundError) else error
    try:
        return _build_just_in_time()
    except Exception as error:  # any build or load failure: report it, the 'local' backend still works
        reason = f"the C++ kernel could not be built ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        if installed is not None:
            reason += f" and the installed one does not load ({str(installed).splitlines()[0][:200]})"
        return reason


def extension() -> ModuleType:
    """The compiled kernel module; a RuntimeError saying why if there is none (see ``unavailable_reason``)."""
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(loaded)
    return loaded


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device``, or None."""
    if device.type != "cpu":
        return f"it runs on CPU tensors, got device {device}"
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def _bias_grad(grad_out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """The gradient of the bias (K, D) (None if empty) from grad_out (BK, D, T, H, X)."""
    if not bias.numel():
        return None
    return grad_out.reshape(-1, *bias.shape, grad_out[0, 0].numel()).sum(dim=(0, 3))


class _WindowMix(torch.autograd.Function):
    """q, k (BK, Dq, T, H, X), v (BK, D, T, H, X), gain (K,), kernel (K, D, P) or empty, tap_index (W,),
    offsets (W, 3), bounds (T + H + X, 2), bias (K, D) or empty -> z (BK, D, T, H, X). The probabilities are
    kept for backward only when ``differentiable`` (inside ``forward``, grad mode is always off and
    ``needs_input_grad`` ignores ``torch.no_grad``)."""

    @staticmethod
    def forward(ctx, q, k, v, gain, kernel, tap_index, offsets, bounds, bias, differentiable):
        save = differentiable and any(ctx.needs_input_grad)
        out, probs = extension().window_mix_forward(q, k, v, gain, kernel, tap_index, offsets, bounds, bias, save)
        ctx.save_for_backward(q, k, v, gain, kernel, tap_index, probs, offsets, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gain, kernel, tap_index, probs, offsets, bias = ctx.saved_tensors
        dq, dk, dv, dgain, dkernel = extension().window_mix_backward(
            q, k, v, gain, kernel, tap_index, probs, grad_out.contiguous(), offsets
        )
        dkernel = dkernel if kernel.numel() else None
        return dq, dk, dv, dgain, dkernel, None, None, None, _bias_grad(grad_out, bias), None


class _DirectWindowMix(torch.autograd.Function):
    """_WindowMix with the 'direct' score computed inside the forward pass: features (BK, Dq, T, H, X), pos
    (K, Dq, N) or empty and temperature (K,) give k = unit(features + pos) per head and q = tau * k, which are
    never written out. Backward recomputes q and k in one pass instead of keeping them."""

    @staticmethod
    def forward(ctx, features, pos, temperature, v, gain, kernel, tap_index, offsets, bounds, bias, differentiable):
        save = differentiable and any(ctx.needs_input_grad)
        out, probs = extension().direct_window_mix_forward(
            features, pos, temperature, v, gain, kernel, tap_index, offsets, bounds, bias, save
        )
        ctx.save_for_backward(features, pos, temperature, v, gain, kernel, tap_index, probs, offsets, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, pos, temperature, v, gain, kernel, tap_index, probs, offsets, bias = ctx.saved_tensors
        kernels = extension()
        flat = features.view(-1, temperature.numel(), features.shape[1], math.prod(features.shape[2:]))  # (B, K, Dq, N)
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
            None,
            _bias_grad(grad_out, bias),
            None,
        )


def _as_3d(t: torch.Tensor, geometry: FusedWindow) -> torch.Tensor:
    """(B, K, C, *S) with 1 <= len(S) <= 3 -> contiguous (B*K, C, T, H, X), (T, H, X) = ``geometry.grid``."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], *geometry.grid).contiguous()


def _kernel_arguments(
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor,
    hood: Neighborhood,
    bias: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], FusedWindow]:
    """The kernel's (v, gain, kernel, tap_index, offsets, bounds, bias) arguments for v (B, K, D, *S), and the window
    they were made for (which adds a convolution term the pass did not fuse)."""
    geometry = fused_window(tuple(v.shape[3:]), hood, None if kernel is None else tuple(kernel.shape[2:]))
    fused = geometry.tap_index is not None
    taps = geometry.tap_index if fused else geometry.offsets.new_zeros(0)
    kernel = kernel.to(v.dtype).flatten(2).contiguous() if fused else v.new_zeros(0)
    bias = v.new_zeros(0) if bias is None else bias.to(v.dtype).contiguous()
    arguments = (_as_3d(v, geometry), gain.to(v.dtype), kernel, taps, geometry.offsets, geometry.bounds, bias)
    return arguments, geometry


def runs_here(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (float32/float64, one dtype, not under torch.compile)."""
    return not torch.compiler.is_compiling() and v.dtype in KERNEL_DTYPES and q.dtype == v.dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """The attention term alone, sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    if not runs_here(q, v):
        return local.attend(q, k, v, hood)
    return mix(q, k, v, None, v.new_ones(v.shape[1]), hood)


_unfused = with_convolution_term(local.attend)


def mix(q, k, v, kernel, gain, hood, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias in one kernel; see convplus.backends for the
    signature."""
    if gain is None or not runs_here(q, v):
        return _unfused(q, k, v, kernel, gain, hood, bias)
    arguments, geometry = _kernel_arguments(v, kernel, gain, hood, bias)
    z = _WindowMix.apply(_as_3d(q, geometry), _as_3d(k, geometry), *arguments, torch.is_grad_enabled())
    return geometry.add_apart(z.view(v.shape), v, kernel, hood)


def direct_mix(
    x: torch.Tensor,
    pos: torch.Tensor | None,
    temperature: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor,
    hood: Neighborhood,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mix`` with the 'direct' score computed inside the kernel: the z that
    ``functional.score_features(x, K, 'direct', pos, temperature)`` followed by ``mix`` gives, without writing q
    and k. x (B, C, *S) with C = K * Dq, pos (C, *S) or None, temperature (K,), v (B, K, D, *S). Tensors the
    kernel does not take (``runs_here``) go that composed way."""
    heads = v.shape[1]
    if not runs_here(x, v):
        q, k = direct_score(x if pos is None else x + pos.to(x.dtype), heads, temperature)
        return mix(q, k, v, kernel, gain, hood, bias)
    arguments, geometry = _kernel_arguments(v, kernel, gain, hood, bias)
    features = _as_3d(x.reshape(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:]), geometry)
    pos = x.new_zeros(0) if pos is None else pos.to(x.dtype).reshape(heads, x.shape[1] // heads, -1).contiguous()
    z = _DirectWindowMix.apply(features, pos, temperature.to(x.dtype), *arguments, torch.is_grad_enabled())
    return geometry.add_apart(z.view(v.shape), v, kernel, hood)
