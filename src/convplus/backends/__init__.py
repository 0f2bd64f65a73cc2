"""Backends of the Conv+ mixing step, behind one signature (as in NATTEN), each described by a ``Backend``
record of what it computes, where it runs and what it needs.

Every backend's ``mix(q, k, v, kernel, gain, hood, bias=None) -> z`` takes q, k (B, K, Dq, *S) (q already
scaled), v (B, K, D, *S), kernel (K, D, *kernel_size) or None (no convolution term), gain (K,) or None (no
attention term), hood a ``neighborhood.Neighborhood`` (window, or None for global; dilation; causal dims;
border rule), bias (K, D) or None. It returns z (B, K, D, *S) = g * sum_{j in N(i)} softmax_j(<q_i, k_j>) v_j
+ depthwise_conv(v, kernel) + bias (the bias of a Conv+ without output projection, added in the same pass),
with the convolution's taps placed as ``hood`` says (centred, or causal).

A backend that computes the 'direct' score inside its pass also has
``direct_mix(x, pos, temperature, v, kernel, gain, hood, bias=None) -> z``: the same z as
``functional.score_features(x, K, 'direct', pos, temperature)`` followed by ``mix``, without writing q and k.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..neighborhood import Neighborhood
from . import cpu, gathered, global_attention, local, reference, triton
from .terms import with_convolution_term

MixFn = Callable[..., torch.Tensor]


def _runs_anywhere(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """A backend of the mixing step.

    name: what ``backend=`` names it.
    mix: the mixing step (signature in the package docstring).
    direct_mix: the mixing step with the 'direct' score computed inside it, or None.
    unavailable_reason: device -> why it cannot run there (a missing package, a kernel that does not build,
        the wrong device), or None when it can. Computed once per process where it is costly.
    needs_window: True if it runs a finite window only (not window=None); every backend runs every causal
        and border option.
    any_layout: True if it reads its tensors in whatever memory layout they come and returns z in v's, so that
        a channels-last input needs no contiguous copy; the others get contiguous tensors.

    Every backend runs under torch.compile and torch.export: the fused kernels are ``torch.library`` custom
    ops, which the graphs keep as single nodes (see ``select`` for what 'auto' picks under export).
    """

    name: str
    mix: MixFn
    direct_mix: MixFn | None = None
    unavailable_reason: Callable[[torch.device], str | None] = _runs_anywhere
    needs_window: bool = False
    any_layout: bool = False


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", with_convolution_term(reference.attend)),
        Backend("local", with_convolution_term(local.attend), needs_window=True),
        Backend("global", global_attention.mix, direct_mix=global_attention.direct_mix, any_layout=True),
        Backend(
            "cpu",
            cpu.mix,
            direct_mix=cpu.direct_mix,
            unavailable_reason=cpu.unavailable_reason,
            needs_window=True,
            any_layout=True,
        ),
        Backend("triton", triton.mix, unavailable_reason=triton.unavailable_reason, needs_window=True),
        Backend("gathered", gathered.mix, needs_window=True),
    )
}
"""Backend name -> its record."""

CHOICES = ("auto", *BACKENDS)

FUSED = {"cpu": "cpu", "cuda": "triton"}
"""Device type -> the fused backend 'auto' picks there for a window that does not cover the grid."""

FALLBACK_COST = {
    "cpu": "the windowed mixer runs as a PyTorch loop ('local'), about 20x slower than the fused C++ kernel",
    "triton": "the windowed mixer runs as a PyTorch loop ('local'), many times slower and with more memory than "
    "the fused Triton kernels",
}
"""Fused backend -> what falling back from it to 'local' costs (CPU ratio: docs/performance.md)."""


class BackendFallbackWarning(UserWarning):
    """``backend='auto'`` could not use the fused backend of the device and runs a slower one."""


_warned: set[tuple[str, str]] = set()
"""(backend, reason) pairs already warned about in this process."""


def _warn_fallback(name: str, reason: str) -> None:
    """Warn once per process that 'auto' falls back from backend ``name`` to 'local', and why."""
    if (name, reason) in _warned:
        return
    _warned.add((name, reason))
    warnings.warn(
        f"backend='auto' cannot use backend {name!r} ({reason}): {FALLBACK_COST[name]}",
        BackendFallbackWarning,
        stacklevel=2,
    )


def select(spatial: tuple[int, ...], device: torch.device, hood: Neighborhood) -> str:
    """The backend ``backend="auto"`` uses for a grid of this size on this device, with this neighborhood:
    'global' (SDPA) when the window is None or covers the grid; else, under ``torch.export`` (and so
    ``torch.onnx.export(dynamo=True)``), 'gathered' (tiles of dense attention: gathers and batched products, which
    an exported program runs anywhere, where the fused kernels' custom ops are unknown); else the device's fused
    backend ('triton' on CUDA, 'cpu' on CPU; under torch.compile too) when it can run here, else 'local', with a
    ``BackendFallbackWarning`` (once per process) saying why the fused one cannot run."""
    if hood.window is None or hood.covers_grid(spatial):
        return "global"
    if torch.compiler.is_exporting():
        return "gathered"
    fused = FUSED.get(device.type)
    if fused is None:
        return "local"
    reason = BACKENDS[fused].unavailable_reason(device)
    if reason is not None:
        _warn_fallback(fused, reason)
        return "local"
    return fused


def resolve(
    name: str,
    spatial: tuple[int, ...],
    device: torch.device,
    hood: Neighborhood,
) -> Backend:
    """The backend ``name`` ('auto': ``select``) for this grid and device, or a ValueError if it is unknown or
    cannot run here, saying why."""
    if name == "auto":
        name = select(spatial, device, hood)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    backend = BACKENDS[name]
    if backend.needs_window and hood.window is None:
        raise ValueError(f"backend {name!r} needs a finite window, got window=None; use 'global' or 'auto'")
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run here: {reason}; use 'local' or 'auto'")
    return backend
