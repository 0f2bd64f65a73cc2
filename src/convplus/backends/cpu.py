"""The 'cpu' backend: the windowed mixing step in one fused C++ kernel, forward and backward: the attention
term, its gain and the depthwise convolution term in a single pass over the window,
z_i = sum_w (g * P_w(i) + r(o_w)) * v_{i + o_w} (+ bias). Parallel over rows, SIMD register tiles over the
contiguous width. An installed package carries the kernel compiled at install time
(``convplus.backends._cpu_kernels``); a source checkout that was never built compiles it with the system's C++
compiler on first use instead (``torch.utils.cpp_extension``, cached afterwards). With the 'direct' score
(``direct_mix``) the pass computes the unit keys and the queries itself from the input features, so they are
never written to memory; backward recomputes them in one pass.

It computes what the 'local' backend computes. It reads its inputs in whatever memory layout they come and writes
its outputs in that of the input they match, so a channels-last network (timm's ConvNeXt) runs it without a layout
copy. The kernel's entry points are ``torch.library`` custom ops
(``convplus::window_mix``, ...), with fake implementations and a registered backward, so ``torch.compile`` and
``torch.export`` keep them in their graphs. float32 and float64 run as given; bfloat16 and float16 (autocast's
inputs) are computed in float32 and returned in their dtype; other dtypes run the 'local' PyTorch loop. A
convolution kernel that reaches past the attention window runs as a separate depthwise conv.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
from collections.abc import Iterator
from types import ModuleType

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..neighborhood import Neighborhood
from . import cpu_build, local
from .fused_window import FusedWindow, fused_window
from .terms import direct_score, with_convolution_term

KERNEL_DTYPES = (torch.float32, torch.float64)
"""The dtypes the kernel computes in."""
INPUT_DTYPES = (*KERNEL_DTYPES, torch.bfloat16, torch.float16)
"""The dtypes it takes: half precision is computed in float32 (autocast's inputs) and returned as given."""


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


@contextlib.contextmanager
def phase_clock() -> Iterator[dict[str, float]]:
    """Times the mixing kernel's phases over the block: the fused kernel is one operator to a profiler, this says
    where its time goes (scores, softmax, aggregation and convolution term, row copies, each backward product).

    Yields a dict, filled when the block ends, of seconds per phase, summed over the threads. Each thread reads a
    steady clock at every phase boundary of a query row, which adds a little to every phase; outside the block the
    boundaries cost nothing measurable. Not reentrant: one block at a time per process.

        with phase_clock() as phases:
            layer(x).sum().backward()
        print(max(phases, key=phases.get))
    """
    kernels = extension()
    phases: dict[str, float] = {}
    kernels.set_phase_clock(True)
    try:
        yield phases
    finally:
        kernels.set_phase_clock(False)
        phases.update(kernels.phase_times())


@torch.compiler.assume_constant_result
def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device``, or None. A constant of the process: torch.compile
    evaluates it while tracing."""
    if device.type != "cpu":
        return f"it runs on CPU tensors, got device {device}"
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


VECTOR_BYTES = 32
"""The kernel's SIMD vector width in bytes (``kVectorBytes`` of csrc/simd.h): it pads each row of probabilities
to whole vectors, which the fake implementations must know."""


def _whole_vectors(n: int, t: torch.Tensor) -> int:
    """n rounded up to a whole number of the kernel's vectors of t's dtype."""
    lanes = VECTOR_BYTES // t.element_size()
    return (n + lanes - 1) // lanes * lanes


def _probs_shape(v: torch.Tensor, width: int, save_probs: bool) -> tuple:
    """The shape of the probabilities the forward pass keeps, (B * K * T * H, W, X rounded up to whole vectors),
    or (0, W, ...) when it keeps none; v (B, K, D, T, H, X), ``width`` the number W of window offsets."""
    rows = v.shape[0] * v.shape[1] * v.shape[3] * v.shape[4] if save_probs else 0
    return rows, width, _whole_vectors(v.shape[5], v)


def _bias_grad(grad_out: torch.Tensor, bias_shape: torch.Size) -> torch.Tensor | None:
    """The gradient of a bias of shape ``bias_shape`` (K, D) (None if it is empty) from grad_out
    (B, K, D, T, H, X)."""
    if not math.prod(bias_shape):
        return None
    return grad_out.sum(dim=(0, 3, 4, 5))


# The kernel's entry points as torch.library custom ops: torch.compile and torch.export keep each one as a single
# node (output shapes from the fake implementations) and differentiate it with the registered backward, which
# calls the backward ops. Eager calls take the same path. Layouts as in the C++ sources: q, k, features
# (B, K, Dq, T, H, X), v and grad_out (B, K, D, T, H, X), of any strides (z and dv are made like v, dq and dk like q
# and k: torch.empty_like, in the fake implementations too); gain (K,), kernel (K, D, P) or empty, tap_index (W,),
# offsets (W, 3), bounds (T + H + X, 2), bias (K, D) or empty, pos (K, Dq, N) or empty, temperature (K,),
# contiguous; one float dtype (float32 or float64), int64 for the index tensors. direct_score's x (B, K, Dq, N) is
# of any strides too, and dx is made like it; q, k, their gradients, pos and inverse_norm are contiguous.


@torch.library.custom_op("convplus::window_mix", mutates_args=())
def window_mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    kernel: torch.Tensor,
    tap_index: torch.Tensor,
    offsets: torch.Tensor,
    bounds: torch.Tensor,
    bias: torch.Tensor,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (BK, D, T, H, X) and the probabilities (``_probs_shape``; kept for backward only when ``save_probs``,
    which a gradient through q, k, v, gain or kernel needs)."""
    out, probs = extension().window_mix_forward(q, k, v, gain, kernel, tap_index, offsets, bounds, bias, save_probs)
    return out, probs


@torch.library.custom_op("convplus::direct_window_mix", mutates_args=())
def direct_window_mix(
    features: torch.Tensor,
    pos: torch.Tensor,
    temperature: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    kernel: torch.Tensor,
    tap_index: torch.Tensor,
    offsets: torch.Tensor,
    bounds: torch.Tensor,
    bias: torch.Tensor,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_mix`` with the 'direct' score computed in the pass: k = unit(features + pos) per head and
    q = temperature * k, never written out."""
    out, probs = extension().direct_window_mix_forward(
        features, pos, temperature, v, gain, kernel, tap_index, offsets, bounds, bias, save_probs
    )
    return out, probs


@torch.library.custom_op("convplus::window_mix_backward", mutates_args=())
def window_mix_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    kernel: torch.Tensor,
    tap_index: torch.Tensor,
    probs: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v, gain and kernel (empty without one) from grad_out (BK, D, T, H, X)."""
    dq, dk, dv, dgain, dkernel = extension().window_mix_backward(
        q, k, v, gain, kernel, tap_index, probs, grad_out, offsets
    )
    return dq, dk, dv, dgain, dkernel


@torch.library.custom_op("convplus::direct_score", mutates_args=())
def direct_score_features(
    x: torch.Tensor, pos: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q = temperature * k, k = unit(x + pos) per head, each (B, K, Dq, N) contiguous, and the inverse norms
    (B, K, N), from x (B, K, Dq, N) of any strides."""
    q, k, inverse_norm = extension().direct_score_forward(x, pos, temperature)
    return q, k, inverse_norm


@torch.library.custom_op("convplus::direct_score_backward", mutates_args=())
def direct_score_backward(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    k: torch.Tensor,
    inverse_norm: torch.Tensor,
    temperature: torch.Tensor,
    x: torch.Tensor,
    with_pos: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x (made in x's layout; x's values are not read), pos ((0, Dq, N) when not ``with_pos``)
    and temperature from those of q and k."""
    dx, dpos, dtemperature = extension().direct_score_backward(
        grad_q, grad_k, k, inverse_norm, temperature, x, with_pos
    )
    return dx, dpos, dtemperature


@torch.library.custom_op("convplus::global_mix", mutates_args=())
def global_mix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor, base: torch.Tensor, save_probs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = base + g * softmax(q^T k) v^T over every position, and the probabilities softmax(q^T k)
    (``_global_probs_shape``; kept for backward only when ``save_probs``): q, k (B, K, Dq, N), v and base
    (B, K, D, N), of any strides; z made like base."""
    z, probs = extension().global_mix_forward(q, k, v, gain, base, save_probs)
    return z, probs


@torch.library.custom_op("convplus::direct_global_mix", mutates_args=())
def direct_global_mix(
    features: torch.Tensor,
    pos: torch.Tensor,
    temperature: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    base: torch.Tensor,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``global_mix`` with the 'direct' score computed in the pass: k = unit(features + pos) per head and
    q = temperature * k, never written out."""
    z, probs = extension().direct_global_mix_forward(features, pos, temperature, v, gain, base, save_probs)
    return z, probs


@torch.library.custom_op("convplus::global_mix_backward", mutates_args=())
def global_mix_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor, probs: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k (contiguous), v (made like v) and gain from that of z, grad_out (B, K, D, N); that of
    base is grad_out itself."""
    dq, dk, dv, dgain = extension().global_mix_backward(q, k, v, gain, probs, grad_out)
    return dq, dk, dv, dgain


def _global_probs_shape(v: torch.Tensor, save_probs: bool) -> tuple:
    """The probabilities the global ops keep, (B * K, N, N rounded up to whole vectors), or (0, N, ...)."""
    return v.shape[0] * v.shape[1] if save_probs else 0, v.shape[3], _whole_vectors(v.shape[3], v)


@global_mix.register_fake
def _(q, k, v, gain, base, save_probs):
    return torch.empty_like(base), v.new_empty(_global_probs_shape(v, save_probs))


@direct_global_mix.register_fake
def _(features, pos, temperature, v, gain, base, save_probs):
    return torch.empty_like(base), v.new_empty(_global_probs_shape(v, save_probs))


@global_mix_backward.register_fake
def _(q, k, v, gain, probs, grad_out):
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(v), torch.empty_like(gain)


def _global_setup(ctx, score_inputs, v, gain, output) -> None:
    """Keeps what the backward of a global op needs: its score inputs (q, k, or features, pos, temperature), v,
    gain and the probabilities."""
    probs = output[1]
    ctx.mark_non_differentiable(probs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*score_inputs, v, gain, probs)


def _global_mix_setup(ctx, inputs, output) -> None:
    q, k, v, gain = inputs[:4]
    _global_setup(ctx, (q, k), v, gain, output)


def _global_mix_grads(ctx, grad_out, _grad_probs) -> tuple:
    if grad_out is None:
        return (None,) * 6
    q, k, v, gain, probs = ctx.saved_tensors
    dq, dk, dv, dgain = global_mix_backward(q, k, v, gain, probs, grad_out)
    return dq, dk, dv, dgain, grad_out, None


def _direct_global_mix_setup(ctx, inputs, output) -> None:
    features, pos, temperature, v, gain = inputs[:5]
    _global_setup(ctx, (features, pos, temperature), v, gain, output)


def _direct_global_mix_grads(ctx, grad_out, _grad_probs) -> tuple:
    """Recomputes q and k from the features in one pass, then runs the global backward and the score's; the
    features' gradient comes back in their layout."""
    if grad_out is None:
        return (None,) * 7
    features, pos, temperature, v, gain, probs = ctx.saved_tensors
    q, k, inverse_norm = direct_score_features(features, pos, temperature)
    dq, dk, dv, dgain = global_mix_backward(q, k, v, gain, probs, grad_out)
    with_pos = pos.numel() > 0
    dx, dpos, dtemperature = direct_score_backward(dq, dk, k, inverse_norm, temperature, features, with_pos)
    return dx, dpos if with_pos else None, dtemperature, dv, dgain, grad_out, None


@window_mix.register_fake
def _(q, k, v, gain, kernel, tap_index, offsets, bounds, bias, save_probs):
    return torch.empty_like(v), v.new_empty(_probs_shape(v, offsets.shape[0], save_probs))


@direct_window_mix.register_fake
def _(features, pos, temperature, v, gain, kernel, tap_index, offsets, bounds, bias, save_probs):
    return torch.empty_like(v), v.new_empty(_probs_shape(v, offsets.shape[0], save_probs))


@window_mix_backward.register_fake
def _(q, k, v, gain, kernel, tap_index, probs, grad_out, offsets):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(gain),
        torch.empty_like(kernel),
    )


@direct_score_features.register_fake
def _(x, pos, temperature):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:2] + x.shape[3:])


@direct_score_backward.register_fake
def _(grad_q, grad_k, k, inverse_norm, temperature, x, with_pos):
    return torch.empty_like(x), k.new_empty(k.shape[1] if with_pos else 0, *k.shape[2:]), torch.empty_like(temperature)


def _window_setup(ctx, score_inputs, window_inputs, output) -> None:
    """Keeps what the backward of a window op needs: its score inputs (q, k, or features, pos, temperature), v,
    gain, kernel, tap_index, offsets, the probabilities, and the bias's shape."""
    v, gain, kernel, tap_index, offsets, _, bias, _ = window_inputs
    probs = output[1]
    ctx.mark_non_differentiable(probs)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the probabilities (as large as the scores)
    ctx.save_for_backward(*score_inputs, v, gain, kernel, tap_index, offsets, probs)
    ctx.bias_shape = bias.shape


def _window_grads(ctx, grad_out, q, k, v, gain, kernel, tap_index, offsets, probs) -> tuple:
    """(dq, dk, dv, dgain, dkernel or None, dbias or None) of a window op from grad_out (B, K, D, T, H, X)."""
    dq, dk, dv, dgain, dkernel = window_mix_backward(q, k, v, gain, kernel, tap_index, probs, grad_out, offsets)
    return dq, dk, dv, dgain, dkernel if kernel.numel() else None, _bias_grad(grad_out, ctx.bias_shape)


def _window_mix_setup(ctx, inputs, output) -> None:
    _window_setup(ctx, inputs[:2], inputs[2:], output)


def _window_mix_grads(ctx, grad_out, _grad_probs) -> tuple:
    if grad_out is None:  # no gradient reached the output (none is filled in: see _window_setup)
        return (None,) * 10
    q, k, *window = ctx.saved_tensors
    dq, dk, dv, dgain, dkernel, dbias = _window_grads(ctx, grad_out, q, k, *window)
    return dq, dk, dv, dgain, dkernel, None, None, None, dbias, None


def _direct_window_mix_setup(ctx, inputs, output) -> None:
    _window_setup(ctx, inputs[:3], inputs[3:], output)


def _direct_window_mix_grads(ctx, grad_out, _grad_probs) -> tuple:
    """Recomputes q and k from the features in one pass, then runs the window's backward and the score's; the
    features' gradient comes back in their layout."""
    if grad_out is None:  # no gradient reached the output (none is filled in: see _window_setup)
        return (None,) * 11
    features, pos, temperature, *window = ctx.saved_tensors
    flat = features.flatten(3)  # (B, K, Dq, N), in the features' layout
    q, k, inverse_norm = direct_score_features(flat, pos, temperature)
    dq, dk, dv, dgain, dkernel, dbias = _window_grads(ctx, grad_out, q.view_as(features), k.view_as(features), *window)
    with_pos = pos.numel() > 0
    dx, dpos, dtemperature = direct_score_backward(
        dq.view_as(flat), dk.view_as(flat), k, inverse_norm, temperature, flat, with_pos
    )
    return (
        dx.view_as(features),
        dpos if with_pos else None,
        dtemperature,
        dv,
        dgain,
        dkernel,
        None,
        None,
        None,
        dbias,
        None,
    )


def _direct_score_setup(ctx, inputs, output) -> None:
    x, pos, temperature = inputs
    _, k, inverse_norm = output
    ctx.mark_non_differentiable(inverse_norm)
    ctx.save_for_backward(x, k, inverse_norm, temperature)
    ctx.with_pos = pos.numel() > 0


def _direct_score_grads(ctx, grad_q, grad_k, _grad_inverse_norm) -> tuple:
    x, k, inverse_norm, temperature = ctx.saved_tensors
    dx, dpos, dtemperature = direct_score_backward(
        grad_q.contiguous(), grad_k.contiguous(), k, inverse_norm, temperature, x, ctx.with_pos
    )
    return dx, dpos if ctx.with_pos else None, dtemperature


window_mix.register_autograd(_window_mix_grads, setup_context=_window_mix_setup)
global_mix.register_autograd(_global_mix_grads, setup_context=_global_mix_setup)
direct_global_mix.register_autograd(_direct_global_mix_grads, setup_context=_direct_global_mix_setup)
direct_score_features.register_autograd(_direct_score_grads, setup_context=_direct_score_setup)
direct_window_mix.register_autograd(_direct_window_mix_grads, setup_context=_direct_window_mix_setup)


def _as_3d(t: torch.Tensor, geometry: FusedWindow) -> torch.Tensor:
    """(B, K, C, *S) with 1 <= len(S) <= 3 -> (B, K, C, T, H, X), (T, H, X) = ``geometry.grid``: a view in t's
    layout (size-1 dims added)."""
    return t.view(*t.shape[:3], *geometry.grid)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the kernel computes these tensors in: their common dtype, float32 for half precision."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype in KERNEL_DTYPES else torch.float32


def _needs_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether a gradient can follow from these inputs (grad mode on and some input requiring one): then the
    forward pass must keep the probabilities, and the op must be seen by autograd. Decided here, outside the op,
    which cannot see grad mode."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_arguments(
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor,
    hood: Neighborhood,
    bias: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], FusedWindow]:
    """The kernel's (v, gain, kernel, tap_index, offsets, bounds, bias) arguments for v (B, K, D, *S), in v's
    dtype, and the window they were made for (which adds a convolution term the pass did not fuse)."""
    geometry = fused_window(tuple(v.shape[3:]), hood, None if kernel is None else tuple(kernel.shape[2:]))
    fused = geometry.tap_index is not None
    taps = geometry.tap_index if fused else geometry.offsets.new_zeros(0)
    kernel = _in(kernel, v.dtype).flatten(2).contiguous() if fused else v.new_zeros(0)
    bias = v.new_zeros(0) if bias is None else _in(bias, v.dtype).contiguous()
    arguments = (_as_3d(v, geometry), _in(gain, v.dtype), kernel, taps, geometry.offsets, geometry.bounds, bias)
    return arguments, geometry


def _in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``: t itself where it is already (``Tensor.to`` would return it too, after a dispatch that
    costs about a microsecond, a dozen times per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _run_op(op, name: str, arguments: tuple, seen: bool) -> tuple[torch.Tensor, ...]:
    """``op(*arguments)``, the forward custom op ``convplus::<name>``. Where nothing needs to see the op (``seen``
    False: an eager call of plain tensors with no gradient to follow, with no dispatch mode active, outside
    torch.compile and torch.export), the kernel's entry point ``<name>_forward`` runs directly: the custom op's
    Python dispatch and checks cost tens of microseconds a call (a 64-channel layer on an 8x8 grid at batch 1:
    120 -> 87 microseconds a forward). The profiler still sees the call under the op's name."""
    seen = seen or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
    if seen or type(arguments[0]) is not torch.Tensor:
        return op(*arguments)
    entry = getattr(extension(), f"{name}_forward")
    if not torch.autograd._profiler_enabled():
        return entry(*arguments)
    with torch.profiler.record_function(f"convplus::{name}"):
        return entry(*arguments)


def runs_here(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: float32/float64, or half precision (computed in float32)."""
    return q.dtype in INPUT_DTYPES and v.dtype in INPUT_DTYPES


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """The attention term alone, sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    if not runs_here(q, v):
        return local.attend(q, k, v, hood)
    return mix(q, k, v, None, v.new_ones(v.shape[1]), hood)


_unfused = with_convolution_term(local.attend)


def mix(q, k, v, kernel, gain, hood, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias in one kernel, computed in ``compute_dtype`` and
    returned in v's dtype; see convplus.backends for the signature."""
    if gain is None or not runs_here(q, v):
        return _unfused(q, k, v, kernel, gain, hood, bias)
    dtype = compute_dtype(q, k, v)
    arguments, geometry = _kernel_arguments(_in(v, dtype), kernel, gain, hood, bias)
    q3, k3 = (_as_3d(_in(t, dtype), geometry) for t in (q, k))
    keeps_probs = _needs_gradient(q, k, v, kernel, gain, bias)
    z, _ = _run_op(window_mix, "window_mix", (q3, k3, *arguments, keeps_probs), keeps_probs)
    return _in(geometry.add_apart(z.view(v.shape), _in(v, dtype), kernel, hood), v.dtype)


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
    dtype = compute_dtype(x, v)
    arguments, geometry = _kernel_arguments(_in(v, dtype), kernel, gain, hood, bias)
    features = _as_3d(_in(x, dtype).view(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:]), geometry)
    flat_pos = x.new_zeros(0, dtype=dtype) if pos is None else _in(pos, dtype).reshape(heads, x.shape[1] // heads, -1)
    keeps_probs = _needs_gradient(x, pos, temperature, v, kernel, gain, bias)
    score_inputs = (features, flat_pos.contiguous(), _in(temperature, dtype))
    z, _ = _run_op(direct_window_mix, "direct_window_mix", (*score_inputs, *arguments, keeps_probs), keeps_probs)
    return _in(geometry.add_apart(z.view(v.shape), _in(v, dtype), kernel, hood), v.dtype)


def _flat_features(x: torch.Tensor, pos: torch.Tensor | None, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The score ops' features (B, K, Dq, N), a view of x (B, C, *S) of any strides, and positional encoding
    (K, Dq, N) contiguous in x's dtype, or empty for pos None."""
    features = x.reshape(x.shape[0], heads, x.shape[1] // heads, -1)
    flat_pos = x.new_zeros(0) if pos is None else _in(pos, x.dtype).reshape(features.shape[1:]).contiguous()
    return features, flat_pos


def direct_score_of(
    x: torch.Tensor, pos: torch.Tensor | None, temperature: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'direct' score's q = tau_k * k and k = unit(slice_k(x + pos)), each (B, K, Dq, *S) and contiguous, in one
    pass of the kernel's op: x (B, C, *S) float32 or float64 of any strides, pos (C, *S) or None, temperature (K,)."""
    features, flat_pos = _flat_features(x, pos, heads)
    arguments = (features, flat_pos, _in(temperature, x.dtype))
    q, k, _ = _run_op(direct_score_features, "direct_score", arguments, _needs_gradient(x, pos, temperature))
    shape = features.shape[:3] + x.shape[2:]
    return q.view(shape), k.view(shape)


def kernel_takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel's ops take these tensors (None: absent) now: one CPU float dtype (float32 or float64),
    outside torch.export (whose programs run without the kernel)."""
    present = [t for t in tensors if t is not None]
    return (
        not torch.compiler.is_exporting()
        and present[0].dtype in KERNEL_DTYPES
        and all(t.dtype == present[0].dtype for t in present)
        and unavailable_reason(present[0].device) is None
    )


def global_mix_of(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """z = base + g * softmax(q^T k) v^T over every position by ``global_mix``, for q, k (B, K, Dq, *S), v and base
    (B, K, D, *S), in base's layout; for tensors that ``kernel_takes``."""
    keeps_probs = _needs_gradient(q, k, v, gain, base)
    arguments = (q.flatten(3), k.flatten(3), v.flatten(3), gain.contiguous(), base.flatten(3), keeps_probs)
    z, _ = _run_op(global_mix, "global_mix", arguments, keeps_probs)
    return z.view(base.shape)


def direct_global_mix_of(
    x: torch.Tensor,
    pos: torch.Tensor | None,
    temperature: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """``global_mix_of`` with the 'direct' score computed in the pass (``direct_global_mix``) from x (B, C, *S),
    pos (C, *S) or None and temperature (K,)."""
    features, flat_pos = _flat_features(x, pos, v.shape[1])
    keeps_probs = _needs_gradient(x, pos, temperature, v, gain, base)
    arguments = (
        features,
        flat_pos,
        temperature.contiguous(),
        v.flatten(3),
        gain.contiguous(),
        base.flatten(3),
        keeps_probs,
    )
    z, _ = _run_op(direct_global_mix, "direct_global_mix", arguments, keeps_probs)
    return z.view(base.shape)
