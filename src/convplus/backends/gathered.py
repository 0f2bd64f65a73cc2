"""The 'gathered' backend: windowed attention as dense attention inside small tiles, made of the operators an
exported graph runs fast (gather, batched matrix products, softmax, a depthwise convolution).

The queries are cut into tiles of ``tile`` consecutive positions per dim (within each dilation group); every
tile attends to the keys its queries can reach, the tile plus a halo of ``w // 2`` steps on each side, with
one batched matrix product for the scores and one for the aggregation. A constant additive bias (0 or -inf)
keeps, for each query, exactly its neighborhood N(i): keys outside its window and outside the grid are
excluded, as in the definition (docs/definition.md, 'Definition'). Tiles and halos are taken with constant
index gathers, so one formulation serves 1 to 3 dims, any dilation and clipped borders, and traces to a
static graph (``torch.export``, ONNX).

Cost: each query scores all the keys of its tile's halo, ``prod(tile + 2 * (w // 2))`` of them, instead of
the ``prod(w)`` of its window; in return the work runs as matrix products, not as one pass per offset.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from ..neighborhood import reachable_halves
from .terms import softmax_probs, with_convolution_term

TILE = 7
"""Default tile side (queries per dim); clipped to each dilation group's length."""


@dataclass(frozen=True)
class Tiling:
    """Constant index tensors that cut a grid of N positions into T tiles of M queries with L keys each.

    queries: (T * M,) int64, the flat grid index of each tile's queries; N (one past the grid) where a tile
        overhangs the grid (a padding query, computed and dropped).
    keys: (T * L,) int64, the flat grid index of each tile's keys; N where the halo leaves the grid.
    bias: (T, M, L) float32, 0 where the key is in the query's neighborhood (and for every key of a padding
        query, so that its row stays finite), -inf elsewhere.
    position: (N,) int64, for each grid position, where its query sits in the (T * M,) tile order.
    tiles, queries_per_tile, keys_per_tile: T, M, L.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    bias: torch.Tensor
    position: torch.Tensor
    tiles: int
    queries_per_tile: int
    keys_per_tile: int


def _tiles_1d(size: int, half: int, step: int, tile: int) -> list[tuple[list[int], list[int]]]:
    """One dim's tiles: for each, its query coordinates (t of them, -1 past the grid) and key coordinates
    (t + 2 * half, -1 outside the grid). A tile holds consecutive positions of one dilation group."""
    tiles = []
    side = min(tile, len(range(0, size, step)))  # the longest group's length: every tile has the same side
    for group in range(min(step, size)):
        length = len(range(group, size, step))
        for start in range(0, length, side):
            queries = [group + (start + a) * step if start + a < length else -1 for a in range(side)]
            keys = [group + (start + b) * step if 0 <= start + b < length else -1 for b in range(-half, side + half)]
            tiles.append((queries, keys))
    return tiles


def _flat_index(coords_per_dim: list[list[int]], spatial: tuple[int, ...]) -> torch.Tensor:
    """The row-major flat grid indices of the product of per-dim coordinates, N = prod(spatial) where any
    coordinate is -1 (outside the grid)."""
    index = torch.zeros([len(c) for c in coords_per_dim], dtype=torch.int64)
    outside = torch.zeros_like(index, dtype=torch.bool)
    for d, coords in enumerate(coords_per_dim):
        c = torch.tensor(coords).view([-1 if e == d else 1 for e in range(len(coords_per_dim))])
        index = index + c.clamp_min(0) * math.prod(spatial[d + 1 :])
        outside = outside | (c < 0)
    return index.masked_fill(outside, math.prod(spatial)).flatten()


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...], tile: int = TILE) -> Tiling:
    """The ``Tiling`` of a grid ``spatial`` for a window (odd ints) and dilation; cached, on the CPU."""
    halves = reachable_halves(spatial, window, dilation)
    per_dim = [_tiles_1d(s, h, r, tile) for s, h, r in zip(spatial, halves, dilation, strict=True)]
    n = math.prod(spatial)
    queries, keys, biases = [], [], []
    for combo in itertools.product(*per_dim):
        q_coords, k_coords = [t[0] for t in combo], [t[1] for t in combo]
        queries.append(_flat_index(q_coords, spatial))
        keys.append(_flat_index(k_coords, spatial))
        # key b of a dim is in query a's window when 0 <= b - a <= 2 * half (and inside the grid)
        allowed = torch.ones(1, 1, dtype=torch.bool)
        for (qc, kc), h in zip(combo, halves, strict=True):
            a, b = torch.arange(len(qc)).view(-1, 1), torch.arange(len(kc)).view(1, -1)
            dim_ok = (b - a >= 0) & (b - a <= 2 * h) & (torch.tensor(kc) >= 0).view(1, -1)
            allowed = (allowed[:, None, :, None] & dim_ok[None, :, None, :]).flatten(2).flatten(0, 1)
        padding_query = (queries[-1] == n).view(-1, 1)
        biases.append(torch.zeros(allowed.shape).masked_fill(~(allowed | padding_query), float("-inf")))
    query_index = torch.cat(queries)
    position = torch.empty(n, dtype=torch.int64)
    real = query_index < n
    position[query_index[real]] = torch.arange(query_index.numel())[real]
    return Tiling(
        queries=query_index,
        keys=torch.cat(keys),
        bias=torch.stack(biases),
        position=position,
        tiles=len(queries),
        queries_per_tile=queries[0].numel(),
        keys_per_tile=keys[0].numel(),
    )


def _gather(t: torch.Tensor, index: torch.Tensor, per_tile: int) -> torch.Tensor:
    """t (B, K, C, N) at the flat positions ``index`` (T * per_tile,), with index N reading zeros ->
    (B, K, T, per_tile, C)."""
    padded = torch.cat([t, t.new_zeros(*t.shape[:3], 1)], dim=3)
    picked = padded.index_select(3, index.to(t.device))
    return picked.view(*t.shape[:3], -1, per_tile).permute(0, 1, 3, 4, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: tuple[int, ...],
    dilation: tuple[int, ...],
    tile: int = TILE,
) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    spatial = tuple(v.shape[3:])
    geometry = tiling(spatial, window, dilation, tile)
    flat = [t.flatten(3) for t in (q, k, v)]
    q_t = _gather(flat[0], geometry.queries, geometry.queries_per_tile)  # (B, K, T, M, Dq)
    k_t = _gather(flat[1], geometry.keys, geometry.keys_per_tile)  # (B, K, T, L, Dq)
    v_t = _gather(flat[2], geometry.keys, geometry.keys_per_tile)  # (B, K, T, L, D)
    scores = torch.matmul(q_t, k_t.transpose(-1, -2)) + geometry.bias.to(device=q.device, dtype=q.dtype)
    z_t = torch.matmul(softmax_probs(scores, v.dtype), v_t)  # (B, K, T, M, D)
    z = z_t.flatten(2, 3).index_select(2, geometry.position.to(v.device))  # (B, K, N, D)
    return z.transpose(2, 3).reshape(v.shape)


mix = with_convolution_term(attend)
