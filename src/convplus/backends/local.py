"""The 'local' backend: windowed attention as a loop over the window's offsets.

Never builds an N x N matrix: the scores are (B, K, *S, W) for a window of W offsets, so time and memory
grow linearly with the number of positions N. The loop runs over every offset some position's window uses
(``neighborhood.window_offsets``); keys outside a position's N(i), out-of-grid keys included, are excluded
with -inf before the softmax (docs/definition.md, 'Definition').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..neighborhood import Neighborhood, offset_ranges, offset_validity, window_offsets
from .terms import softmax_probs


def _shifted(padded: torch.Tensor, pads: list[tuple[int, int]], offset: tuple[int, ...], spatial: tuple[int, ...]):
    """The view of ``padded`` (B, K, D, *(S + left + right pad)) holding position i + offset at index i."""
    index = tuple(slice(left + o, left + o + s) for (left, _), o, s in zip(pads, offset, spatial, strict=True))
    return padded[(Ellipsis, *index)]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    spatial = tuple(v.shape[3:])
    pads = [(-r.start, r[-1]) for r in offset_ranges(spatial, hood)]
    pad_arg = [p for pad in reversed(pads) for p in pad]
    k_pad, v_pad = F.pad(k, pad_arg), F.pad(v, pad_arg)
    offsets = window_offsets(spatial, hood)
    scores = torch.stack([(q * _shifted(k_pad, pads, o, spatial)).sum(dim=2) for o in offsets], dim=-1)
    valid = offset_validity(spatial, offsets, hood, v.device)  # scores: (B, K, *S, W)
    probs = softmax_probs(scores.masked_fill(~valid, float("-inf")), v.dtype)
    return sum(probs[..., w].unsqueeze(2) * _shifted(v_pad, pads, o, spatial) for w, o in enumerate(offsets))
