"""The 'global' backend: the attention term over the whole grid, or over any neighborhood through a mask.

For window=None (or a window that covers the grid) no mask is needed: on CPU, grids of up to
``EXPLICIT_PRODUCTS_MAX_POSITIONS`` positions take explicit products (scores, softmax, weighted sum): with a
convolution term, in float32 or float64, outside ``torch.export``, the C++ kernel's fused pass (``cpu.global_mix``
and ``cpu.direct_global_mix``, forward and backward), which adds them to the conv term; else PyTorch's products.
Larger grids and other devices run ``torch.nn.functional.scaled_dot_product_attention`` and its fused kernels.
A 1-d causal global attention uses SDPA's own ``is_causal``; any other neighborhood is passed to SDPA as a dense
(N, N) boolean mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..neighborhood import Neighborhood, neighborhood_mask
from . import cpu
from .terms import add_attention, blend, convolution_term, direct_score

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
    """softmax(q^T k) v^T over all keys: q, k (B, K, Dq, N), v (B, K, D, N) -> (B, K, N, D). The scores' product
    reads q and k without a copy where their (B, K) dims merge (contiguous q, k: the 'direct' score's own op makes
    them so). The softmax runs in at least float32 (bfloat16 and float16 scores, as autocast makes them, are
    widened for it)."""
    scores = q.transpose(-1, -2) @ k  # (B, K, N, N)
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    return probs @ v.transpose(-1, -2)


def _explicit(spatial: tuple[int, ...], hood: Neighborhood, device: torch.device) -> bool:
    """Whether the attention runs as explicit products: unmasked (the window covers the grid) on a CPU grid of at
    most ``EXPLICIT_PRODUCTS_MAX_POSITIONS`` positions."""
    return hood.covers_grid(spatial) and device.type == "cpu" and math.prod(spatial) <= EXPLICIT_PRODUCTS_MAX_POSITIONS


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S), a view of the products'
    (B, K, N, D) rows, in the products' dtype (autocast's lower precision under autocast)."""
    spatial = tuple(v.shape[3:])
    if _explicit(spatial, hood, v.device):
        out = _explicit_products(q.flatten(3), k.flatten(3), v.flatten(3))  # (B, K, N, D)
    else:
        mask, is_causal = None, False
        if not hood.covers_grid(spatial):
            is_causal = hood.window is None and len(spatial) == 1  # j <= i: SDPA's causal mask
            mask = None if is_causal else neighborhood_mask(spatial, hood, v.device)
        rows = _rows(q), _rows(k), _rows(v)
        out = F.scaled_dot_product_attention(*rows, attn_mask=mask, is_causal=is_causal, scale=1.0)
    return out.transpose(2, 3).view(v.shape)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S), in v's layout and in the
    products' dtype (autocast's lower precision under autocast)."""
    z = _attention(q, k, v, hood)
    return z if z.stride() == v.stride() else torch.empty_like(v, dtype=z.dtype).copy_(z)


def mix(q, k, v, kernel, gain, hood, bias=None) -> torch.Tensor:
    """z = g * attention term + depthwise conv term + bias, in v's layout; see convplus.backends for the
    signature. With both terms the conv adds the bias, and ``_add_attention`` the attention."""
    if gain is None or kernel is None:
        return blend(None if gain is None else attend(q, k, v, hood), gain, v, kernel, hood, bias)
    return _add_attention(convolution_term(v, kernel, hood, bias), q, k, v, gain, hood)


def direct_mix(x, pos, temperature, v, kernel, gain, hood, bias=None) -> torch.Tensor:
    """``mix`` with the 'direct' score's q and k computed by the C++ kernel where it takes the tensors: inside
    ``direct_global_mix`` on grids that take explicit products, else by its one-pass score op, whose contiguous q
    and k the scores' product reads without a copy; else composed (``terms.direct_score``). See convplus.backends
    for the signature."""
    if gain is None or kernel is None:
        return mix(*_direct_score(x, pos, temperature, v.shape[1]), v, kernel, gain, hood, bias)
    base = convolution_term(v, kernel, hood, bias)
    if _explicit(tuple(v.shape[3:]), hood, v.device) and cpu.kernel_takes(x, pos, temperature, v, gain, base):
        return cpu.direct_global_mix_of(x, pos, temperature, v, gain, base)
    return _add_attention(base, *_direct_score(x, pos, temperature, v.shape[1]), v, gain, hood)


def _add_attention(
    base: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor, hood: Neighborhood
) -> torch.Tensor:
    """base + g * attention term, in base's layout: by the C++ kernel's ``global_mix`` on grids that take explicit
    products, else by one pass that reads the products' rows in place."""
    if _explicit(tuple(v.shape[3:]), hood, v.device) and cpu.kernel_takes(q, k, v, gain, base):
        return cpu.global_mix_of(q, k, v, gain, base)
    return add_attention(base, _attention(q, k, v, hood), gain)


def _direct_score(
    x: torch.Tensor, pos: torch.Tensor | None, temperature: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'direct' score's q and k (B, K, Dq, *S): by the C++ kernel's one-pass op where it takes x (contiguous
    q and k), else composed."""
    if cpu.kernel_takes(x):
        return cpu.direct_score_of(x, pos, temperature, heads)
    return direct_score(x if pos is None else x + pos.to(x.dtype), heads, temperature)
