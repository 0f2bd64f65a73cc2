"""Peers of the Conv+ mixer for the benchmarks: the obvious unfold-based neighborhood attention, FlexAttention
with a neighborhood block mask, and NATTEN. All take q, k, v of shape (B, K, D, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unfold_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Each query attends to its zero-padded window x window neighborhood gathered with F.unfold."""
    b, heads, d, h, w = v.shape
    pad = window // 2

    def neighbors(t):  # (B, K, D, N, W)
        return F.unfold(t.reshape(b, heads * d, h, w), window, padding=pad).view(b, heads, d, window * window, h * w)

    scores = (q.reshape(b, heads, d, 1, h * w) * neighbors(k)).sum(2)  # (B, K, W, N)
    probs = scores.softmax(dim=2)
    return (probs.unsqueeze(2) * neighbors(v)).sum(3).view(v.shape)


def flex_neighborhood_attention(window: int, h: int, w: int):
    """A compiled FlexAttention function for a window x window neighborhood on an h x w grid."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    radius = window // 2

    def mask(b, head, q_idx, kv_idx):
        return ((q_idx // w - kv_idx // w).abs() <= radius) & ((q_idx % w - kv_idx % w).abs() <= radius)

    block_mask = create_block_mask(mask, None, None, h * w, h * w, device="cpu")
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        shape = v.shape
        flat = [t.flatten(3).transpose(2, 3) for t in (q, k, v)]
        return compiled(*flat, block_mask=block_mask).transpose(2, 3).reshape(shape)

    return run


def natten_neighborhood_attention(window: int):
    """NATTEN's ``na2d`` on its CPU-capable backend: Flex Attention, uncompiled (NATTEN compiles Flex only on
    CUDA devices). Its windows shift inward at the borders instead of shrinking. Raises ImportError without
    natten."""
    import natten

    def run(q, k, v):
        shape = v.shape
        out = natten.na2d(*(t.permute(0, 3, 4, 1, 2) for t in (q, k, v)), kernel_size=window, backend="flex-fna")
        return out.permute(0, 3, 4, 1, 2).reshape(shape)

    return run
