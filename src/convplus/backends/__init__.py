"""Backends of the Conv+ mixing step, behind one signature (as in NATTEN).

Each backend is a function ``mix(q, k, v, kernel, gain, window, dilation, bias=None) -> z`` with
q, k (B, K, Dq, *S) (q already scaled), v (B, K, D, *S), kernel (K, D, *kernel_size) or None (no convolution
term), gain (K,) or None (no attention term), window a tuple of odd ints or None (global), dilation a tuple,
bias (K, D) or None. It returns z (B, K, D, *S) = g * sum_{j in N(i)} softmax_j(<q_i, k_j>) v_j +
depthwise_conv(v, kernel) + bias (the bias of a Conv+ without output projection, added in the same pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..neighborhood import covers_grid
from . import cpu, global_attention, local, reference, triton
from .terms import with_convolution_term

MixFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, MixFn] = {
    "reference": with_convolution_term(reference.attend),
    "local": with_convolution_term(local.attend),
    "global": with_convolution_term(global_attention.attend),
    "cpu": cpu.mix,
    "triton": triton.mix,
}
"""Backend name -> mix function. Fast backends register themselves here when they can run."""

CHOICES = ("auto", *BACKENDS)


def select(
    spatial: tuple[int, ...], device: torch.device, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> str:
    """The backend ``backend="auto"`` uses for a grid of this size on this device, with this window:
    'global' (SDPA) when the window covers the grid; else the Triton kernels on CUDA, the fused C++ kernel
    on CPU if it builds here (not under torch.compile / torch.export, which trace the 'local' PyTorch loop
    instead), else 'local'."""
    if covers_grid(spatial, window, dilation):
        return "global"
    if device.type == "cuda" and triton.unavailable_reason(device) is None:
        return "triton"
    if device.type == "cpu" and not torch.compiler.is_compiling() and cpu.unavailable_reason() is None:
        return "cpu"
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
    if name in ("local", "cpu", "triton") and window is None:
        raise ValueError(f"backend {name!r} needs a finite window, got window=None; use 'global' or 'auto'")
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on CPU tensors, got device {device}; use 'local' or 'auto'")
        reason = cpu.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend 'cpu' cannot run here: {reason}; use 'local'")
    if name == "triton":
        reason = triton.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend 'triton' cannot run here: {reason}")
    return BACKENDS[name]
