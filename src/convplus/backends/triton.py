"""The 'triton' backend: the windowed mixing step (attention term, gain and, when its kernel fits in the window,
the depthwise conv term, in one pass) in Triton kernels (``triton_kernels``) on CUDA.

The kernel module (and triton) is imported on first use, so that ``import convplus`` never needs triton.
With ``TRITON_INTERPRET=1`` set before that first use, the kernels run on CPU tensors in Triton's
interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .fused_window import fused_window
from .terms import add_bias, blend


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result
def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None. A constant of the process: torch.compile
    evaluates it while tracing."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type != "cuda" and not interpreted():
        return f"it needs a CUDA GPU, got device {device.type!r} (TRITON_INTERPRET=1 runs it on CPU, slowly)"
    return None


def mix(q, k, v, kernel, gain, hood, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias; see convplus.backends for the signature."""
    from .triton_kernels import window_mix

    if gain is None:  # the conv term alone
        return blend(None, None, v, kernel, hood, bias)
    geometry = fused_window(tuple(v.shape[3:]), hood, None if kernel is None else tuple(kernel.shape[2:]))
    taps = None
    if geometry.tap_index is not None:  # the kernel's taps at the window offsets (K, D, W), zero where it has none
        index = geometry.tap_index.to(v.device)
        slots = torch.where(index >= 0, index, kernel[0, 0].numel())
        flat = torch.cat([kernel.flatten(2), kernel.new_zeros(*kernel.shape[:2], 1)], dim=2)
        taps = flat[:, :, slots]

    def flat3(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], t.shape[2], -1).contiguous()

    offsets, bounds = geometry.offsets.to(v.device), geometry.bounds.to(v.device)
    z, _, _ = window_mix(flat3(q), flat3(k), flat3(v), gain, taps, offsets, bounds, list(geometry.grid))
    z = z.view(v.shape)
    return add_bias(geometry.add_apart(z, v, kernel, hood), bias)
