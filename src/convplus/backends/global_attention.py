"""The 'global' backend: the attention term through ``torch.nn.functional.scaled_dot_product_attention``.

For window=None (or a window that covers the grid) no mask is needed and SDPA can use its fused kernels;
a window that does not cover the grid is passed as a dense (N, N) boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..neighborhood import covers_grid, neighborhood_mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    spatial = tuple(v.shape[3:])
    mask = None if covers_grid(spatial, window, dilation) else neighborhood_mask(spatial, window, dilation, v.device)
    out = F.scaled_dot_product_attention(
        q.flatten(3).transpose(2, 3),
        k.flatten(3).transpose(2, 3),
        v.flatten(3).transpose(2, 3),
        attn_mask=mask,
        scale=1.0,
    )  # (B, K, N, D)
    return out.transpose(2, 3).reshape(v.shape)
