"""Backends of the Conv+ mixing step, behind one signature (as in NATTEN).

Each backend is a function ``mix(q, k, v, kernel, gain, window, dilation) -> z`` with
q, k (B, K, Dq, *S) (q already scaled), v (B, K, D, *S), kernel (K, D, *kernel_size) or None (no convolution
term), gain (K,) or None (no attention term), window a tuple of odd ints or None (global), dilation a tuple.
It returns z (B, K, D, *S) = g * sum_{j in N(i)} softmax_j(<q_i, k_j>) v_j + depthwise_conv(v, kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..neighborhood import covers_grid
from . import global_attention, local, reference
from .terms import with_convolution_term

MixFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, MixFn] = {
    "reference": with_convolution_term(reference.attend),
    "local": with_convolution_term(local.attend),
    "global": with_convolution_term(global_attention.attend),
}
"""Backend name -> mix function. Fast backends register themselves here when they can run."""

CHOICES = ("auto", *BACKENDS)


def select(
    spatial: tuple[int, ...], device: torch.device, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> str:
    """The backend ``backend="auto"`` uses for a grid of this size on this device, with this window."""
    if covers_grid(spatial, window, dilation):
        return "global"
    return "local"


def resolve(
    name: str,
    spatial: tuple[int, ...],
    device: torch.device,
    window: tuple[int, ...] | None,
    dilation: tuple[int, ...],
) -> MixFn:
    """The mix function for backend ``name`` on this grid and device, or a ValueError if it is unknown or
    cannot run here."""
    if name == "auto":
        name = select(spatial, device, window, dilation)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    if name == "local" and window is None:
        raise ValueError("backend 'local' needs a finite window, got window=None; use 'global' or 'auto'")
    return BACKENDS[name]
