"""The 'global' backend: the attention term through ``torch.nn.functional.scaled_dot_product_attention``.

For window=None (or a window that covers the grid) no mask is needed and SDPA can use its fused kernels;
a window that does not cover the grid is passed as a dense (N, N) boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..neighborhood import covers_grid, neighborhood_mask
from .terms import blend


def mix(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor | None,
    window: tuple[int, ...] | None,
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """z (B, K, D, *S) = g * sum_{j in N(i)} A(i, j) V_j + conv term (see ``convplus.functional.mix``)."""
    attention = None
    if gain is not None:
        spatial = tuple(v.shape[3:])
        mask = None
        if not covers_grid(spatial, window, dilation):
            mask = neighborhood_mask(spatial, window, dilation, v.device)
        out = F.scaled_dot_product_attention(
            q.flatten(3).transpose(2, 3),
            k.flatten(3).transpose(2, 3),
            v.flatten(3).transpose(2, 3),
            attn_mask=mask,
            scale=1.0,
        )  # (B, K, N, D)
        attention = out.transpose(2, 3).reshape(v.shape)
    return blend(attention, gain, v, kernel, dilation)
