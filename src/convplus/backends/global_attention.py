"""The 'global' backend: the attention term through ``torch.nn.functional.scaled_dot_product_attention``.

For window=None (or a window that covers the grid) no mask is needed and SDPA can use its fused kernels; a
1-d causal global attention uses SDPA's own ``is_causal``; any other neighborhood is passed as a dense (N, N)
boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..neighborhood import Neighborhood, neighborhood_mask


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, K, C, *S) as (B, K, N, C) rows with contiguous channels: a view of a channels-last tensor, a copy of
    others. SDPA's fused CPU kernel needs a last-dim stride of 1; without it SDPA runs its math path, several
    times slower."""
    rows = t.flatten(3).transpose(2, 3)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S), in v's layout."""
    spatial = tuple(v.shape[3:])
    mask, is_causal = None, False
    if not hood.covers_grid(spatial):
        is_causal = hood.window is None and len(spatial) == 1  # j <= i: SDPA's causal mask
        mask = None if is_causal else neighborhood_mask(spatial, hood, v.device)
    out = F.scaled_dot_product_attention(
        _rows(q), _rows(k), _rows(v), attn_mask=mask, is_causal=is_causal, scale=1.0
    )  # (B, K, N, D)
    z = out.transpose(2, 3).reshape(v.shape)
    return z if z.stride() == v.stride() else torch.empty_like(v).copy_(z)
