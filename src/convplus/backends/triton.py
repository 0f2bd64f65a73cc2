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

from ..neighborhood import kernel_tap_index, reachable_halves, window_offsets
from .terms import add_bias, blend, convolution_term


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type != "cuda" and not interpreted():
        return f"it needs a CUDA GPU, got device {device.type!r} (TRITON_INTERPRET=1 runs it on CPU, slowly)"
    return None


def mix(q, k, v, kernel, gain, window, dilation, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias; see convplus.backends for the signature."""
    from .triton_kernels import WindowMix

    if gain is None:  # the conv term alone
        return blend(None, None, v, kernel, dilation, bias)
    spatial = tuple(v.shape[3:])
    offsets = window_offsets(reachable_halves(spatial, window, dilation), dilation)
    padded = torch.tensor([(0,) * (3 - len(spatial)) + o for o in offsets], dtype=torch.int64, device=v.device)
    grid = (1,) * (3 - len(spatial)) + spatial
    index = None if kernel is None else kernel_tap_index(spatial, window, dilation, tuple(kernel.shape[2:]))
    taps = None
    if index is not None:  # the kernel's taps at the window offsets (K, D, W), zero where it has none
        slots = torch.tensor([i if i >= 0 else kernel[0, 0].numel() for i in index], device=v.device)
        flat = torch.cat([kernel.flatten(2), kernel.new_zeros(*kernel.shape[:2], 1)], dim=2)
        taps = flat[:, :, slots]

    def flat3(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], t.shape[2], -1).contiguous()

    z = WindowMix.apply(flat3(q), flat3(k), flat3(v), gain, taps, padded, grid).view(v.shape)
    if kernel is not None and index is None:  # the kernel reaches past the window: a separate conv term
        z = z + convolution_term(v, kernel, dilation)
    return add_bias(z, bias)
