"""The 'reference' backend: docs/definition.md written plainly, with a dense masked N x N attention matrix.

O(N^2) time and memory. Every other backend is tested against this one.
"""

from __future__ import annotations

import torch

from ..neighborhood import Neighborhood, neighborhood_mask
from .terms import softmax_probs


def attention_probs(q: torch.Tensor, k: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """A_k(i, j): q, k (B, K, Dq, *S) -> (B, K, N, N), rows = queries, grid flattened row-major."""
    spatial = tuple(q.shape[3:])
    scores = torch.einsum("bkci,bkcj->bkij", q.flatten(3), k.flatten(3))
    if not hood.covers_grid(spatial):
        scores = scores.masked_fill(~neighborhood_mask(spatial, hood, q.device), float("-inf"))
    return softmax_probs(scores, q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hood: Neighborhood) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    probs = attention_probs(q, k, hood)
    return torch.einsum("bkij,bkcj->bkci", probs, v.flatten(3)).view(v.shape)
