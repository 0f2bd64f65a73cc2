"""The 'triton' backend: the windowed attention term in Triton kernels (``triton_kernel``) on CUDA.

The kernel module (and triton) is imported on first use, so that ``import convplus`` never needs triton.
With ``TRITON_INTERPRET=1`` set before that first use, the kernels run on CPU tensors in Triton's
interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..neighborhood import reachable_halves, window_offsets


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type != "cuda" and not interpreted():
        return f"it needs a CUDA GPU, got device {device.type!r} (TRITON_INTERPRET=1 runs it on CPU, slowly)"
    return None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    from .triton_kernel import WindowedAttention

    spatial = tuple(v.shape[3:])
    offsets = window_offsets(reachable_halves(spatial, window, dilation), dilation)
    padded = torch.tensor([(0,) * (3 - len(spatial)) + o for o in offsets], dtype=torch.int64, device=v.device)
    grid = (1,) * (3 - len(spatial)) + spatial

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], t.shape[2], -1).contiguous()

    return WindowedAttention.apply(flat(q), flat(k), flat(v), padded, grid).view(v.shape)
