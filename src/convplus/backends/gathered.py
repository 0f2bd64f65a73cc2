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

import numpy as np
import torch

from ..neighborhood import reachable_halves
from .terms import softmax_probs, with_convolution_term

TILE = 7
"""Default tile side (queries per dim); clipped to each dilation group's length."""


@dataclass(frozen=True)
class Tiling:
    """Constant index arrays that cut a grid of N positions into T tiles of M queries with L keys each. NumPy
    arrays, so that tracing (``torch.export``) takes them as constants instead of tracing their construction.

    queries: (T * M,) int64, the flat grid index of each tile's queries; N (one past the grid) where a tile
        overhangs the grid (a padding query, computed and dropped).
    keys: (T * L,) int64, the flat grid index of each tile's keys; N where the halo leaves the grid.
    bias: (T, M, L) float32, 0 where the key is in the query's neighborhood (and for every key of a padding
        query, so that its row stays finite), -inf elsewhere.
    position: (N,) int64, for each grid position, where its query sits in the (T * M,) tile order.
    """

    queries: np.ndarray
    keys: np.ndarray
    bias: np.ndarray
    position: np.ndarray

    @property
    def queries_per_tile(self) -> int:
        return self.bias.shape[1]

    @property
    def keys_per_tile(self) -> int:
        return self.bias.shape[2]


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


def _flat_index(coords_per_dim: list[list[int]], spatial: tuple[int, ...]) -> np.ndarray:
    """The row-major flat grid indices of the product of per-dim coordinates, N = prod(spatial) where any
    coordinate is -1 (outside the grid)."""
    grids = np.meshgrid(*[np.asarray(c) for c in coords_per_dim], indexing="ij")
    outside = np.any([g < 0 for g in grids], axis=0)
    index = np.ravel_multi_index([np.maximum(g, 0) for g in grids], spatial)
    return np.where(outside, math.prod(spatial), index).ravel()


def _neighborhood_bias(combo: tuple, halves: tuple[int, ...], padding_query: np.ndarray) -> np.ndarray:
    """(M, L) float32 of one tile: 0 where key b is in query a's window in every dim (0 <= b - a <= 2 * half)
    and inside the grid, or where the query is padding; -inf elsewhere."""
    allowed = np.ones((1, 1), dtype=bool)
    for (queries, keys), half in zip(combo, halves, strict=True):
        a, b = np.arange(len(queries))[:, None], np.arange(len(keys))[None, :]
        dim_ok = (b - a >= 0) & (b - a <= 2 * half) & (np.asarray(keys) >= 0)[None, :]
        allowed = (allowed[:, None, :, None] & dim_ok[None, :, None, :]).reshape(allowed.shape[0] * dim_ok.shape[0], -1)
    return np.where(allowed | padding_query[:, None], 0.0, -np.inf).astype(np.float32)


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...], tile: int = TILE) -> Tiling:
    """The ``Tiling`` of a grid ``spatial`` for a window (odd ints) and dilation; cached."""
    halves = reachable_halves(spatial, window, dilation)
    per_dim = [_tiles_1d(s, h, r, tile) for s, h, r in zip(spatial, halves, dilation, strict=True)]
    n = math.prod(spatial)
    queries, keys, biases = [], [], []
    for combo in itertools.product(*per_dim):
        queries.append(_flat_index([t[0] for t in combo], spatial))
        keys.append(_flat_index([t[1] for t in combo], spatial))
        biases.append(_neighborhood_bias(combo, halves, queries[-1] == n))
    query_index = np.concatenate(queries)
    position = np.empty(n, dtype=np.int64)
    real = query_index < n
    position[query_index[real]] = np.arange(query_index.size)[real]
    return Tiling(queries=query_index, keys=np.concatenate(keys), bias=np.stack(biases), position=position)


def _gather(t: torch.Tensor, index: np.ndarray, per_tile: int) -> torch.Tensor:
    """t (B, K, C, N) at the flat positions ``index`` (T * per_tile,), with index N reading zeros ->
    (B, K, T, per_tile, C). Channels go last, so that each index copies a contiguous row of C values (one value
    at a time, along the last dim, is several times slower in onnxruntime) and the result needs no transpose."""
    rows = t.transpose(2, 3)  # (B, K, N, C)
    rows = torch.cat([rows, rows.new_zeros(*rows.shape[:2], 1, rows.shape[3])], dim=2)
    picked = rows.index_select(2, torch.as_tensor(index, device=t.device))
    return picked.view(*t.shape[:2], -1, per_tile, t.shape[2])


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
    bias = torch.as_tensor(geometry.bias, device=q.device).to(q.dtype)
    scores = torch.matmul(q_t, k_t.transpose(-1, -2)) + bias
    z_t = torch.matmul(softmax_probs(scores, v.dtype), v_t)  # (B, K, T, M, D)
    z = z_t.flatten(2, 3).index_select(2, torch.as_tensor(geometry.position, device=v.device))  # (B, K, N, D)
    return z.transpose(2, 3).reshape(v.shape)


mix = with_convolution_term(attend)
