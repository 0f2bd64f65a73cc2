"""The 'global' backend: the attention term over the whole grid, or over any neighborhood through a mask.

For window=None (or a window that covers the grid) no mask is needed: on CPU, grids of up to
``EXPLICIT_PRODUCTS_MAX_POSITIONS`` positions take explicit products (scores, softmax, weighted sum), larger ones
and other devices ``torch.nn.functional.scaled_dot_product_attention`` and its fused kernels. A 1-d causal global
attention uses SDPA's own ``is_causal``; any other neighborhood is passed to SDPA as a dense (N, N) boolean mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..neighborhood import Neighborhood, neighborhood_mask

EXPLICIT_PRODUCTS_MAX_POSITIONS = 144
"""The most grid positions N (12x12) for which the unmasked attention runs as explicit products on CPU. There a
score matrix is small, and SDPA's fused CPU kernel is slower than the two matrix products around a softmax:
16 images, 4 heads, 2 threads, explicit over SDPA, forward · forward+backward: N=49 (a 7x7 grid), 80 channels a
head 0.65x · 0.69x; N=144, 40 channels 0.78x · 0.72x; N=196 (14x14), 40 channels 1.04x · 0.92x."""


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, K, C, *S) as (B, K, N, C) rows with contiguous channels: a view of a channels-last tensor, a copy of
    others. SDPA's fused CPU kernel needs a last-dim stride of 1; without it SDPA runs its math path, several
    times slower."""
    rows = t.flatten(3).transpose(2, 3)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _explicit_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v over all keys: q, k (B, K, N, Dq), v (B, K, N, D) -> (B, K, N, D). The softmax runs in at
    least float32 (bfloat16 and float16 scores, as autocast makes them, are widened for it)."""
    scores = q @ k.transpose(-1, -2)  # (B, K, N, N)
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    return probs @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S), in v's layout and in the
    products' dtype (autocast's lower precision under autocast)."""
    spatial = tuple(v.shape[3:])
    mask, is_causal = None, False
    if not hood.covers_grid(spatial):
        is_causal = hood.window is None and len(spatial) == 1  # j <= i: SDPA's causal mask
        mask = None if is_causal else neighborhood_mask(spatial, hood, v.device)
    rows = _rows(q), _rows(k), _rows(v)
    if (
        mask is None
        and not is_causal
        and v.device.type == "cpu"
        and math.prod(spatial) <= EXPLICIT_PRODUCTS_MAX_POSITIONS
    ):
        out = _explicit_products(*rows)  # (B, K, N, D)
    else:
        out = F.scaled_dot_product_attention(*rows, attn_mask=mask, is_causal=is_causal, scale=1.0)
    z = out.transpose(2, 3).reshape(v.shape)
    return z if z.stride() == v.stride() else torch.empty_like(v, dtype=z.dtype).copy_(z)
