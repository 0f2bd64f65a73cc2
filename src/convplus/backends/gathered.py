"""The 'gathered' backend: windowed attention as dense attention inside small tiles, made of the operators an
exported graph runs fast (gather, batched matrix products, softmax, a depthwise convolution).

The queries are cut into tiles of consecutive positions per dim (within each dilation group); every tile
attends to the keys its queries can reach: the tile plus a halo spanning, per dim, the union of the
windows' offsets (``neighborhood.offset_ranges``: ``w // 2`` steps on each side for a centred window, ``w - 1``
steps back along a causal dim, ``w - 1`` steps on each side under border 'shift'), with one batched matrix
product for the scores and one for the aggregation. A constant additive bias (0 or -inf) keeps, for each query,
exactly its neighborhood N(i): keys outside its window (``neighborhood.dim_bounds``, causal and border rules
included) and outside the grid are excluded, as in the definition (docs/definition.md, 'Definition'). Tiles
and halos are taken with constant index gathers, so one formulation serves 1 to 3 dims, any dilation, causal
dims and both border rules, and traces to a static graph (``torch.export``, ONNX).

Cost: each query scores all the keys of its tile and halo, ``prod(side + before + after)`` of them (before, after:
the halo's steps on each side), instead of the ``prod(w)`` of its window; in return the work runs as matrix
products, not as one pass per offset. Smaller tiles score fewer keys but gather more rows (each tile gathers its
halo again), so the sides are chosen per grid (``tile_sides``); a dim may instead be spanned by one tile whose
keys are the dim's points (a 7x7 grid under a 7x7 window: 49 keys per query), and a grid spanned in every dim
runs as one dense masked attention, with no gathers.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..neighborhood import Neighborhood, offset_ranges
from .terms import softmax_probs, with_convolution_term

GATHER_COST = 16.0
"""What gathering one row (a key's, a query's or an output's channels) costs, in keys scored: the weight of the
gathers against the scores, softmax and aggregation when the tile sides are chosen (``tile_sides``). Fitted to
onnxruntime on CPU (one ConvPlus2d layer of ConvNeXt V2 atto's stages at 56x56, 28x28 and 14x14, 2 threads),
where it ranks the sides as measured: 4 at 56 and 28, one tile spanning each dim at 14 and 7."""

MAX_TILE = 16
"""The longest tile side ``tile_sides`` considers (a tile spanning its whole dim aside)."""


@dataclass(frozen=True)
class TileSide:
    """One dim's tiles: ``side`` queries of a dilation group each, with a halo of keys, or, ``spans``, one tile per
    group whose keys are the group's points (no halo)."""

    side: int
    spans: bool

    def keys(self, halo: int) -> int:
        """Keys per tile in this dim, for a halo of ``halo`` group steps in all."""
        return self.side if self.spans else self.side + halo


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


def _tiles_1d(size: int, before: int, after: int, step: int, tile: TileSide) -> list[tuple[np.ndarray, np.ndarray]]:
    """One dim's tiles: for each, its query coordinates (``tile.side`` of them, -1 past the grid) and key
    coordinates (side + before + after of them, from ``before`` group steps before the tile to ``after`` past it,
    -1 outside the grid; or, where one tile spans each group, the group's points). A tile holds consecutive
    positions of one dilation group."""
    result = []
    side = tile.side
    for group in range(min(step, size)):
        length = len(range(group, size, step))
        for start in range(0, length, side):
            a = start + np.arange(side)
            b = a if tile.spans else start + np.arange(-before, side + after)
            queries = np.where(a < length, group + a * step, -1)
            keys = np.where((b >= 0) & (b < length), group + b * step, -1)
            result.append((queries, keys))
    return result


def _halos(spatial: tuple[int, ...], hood: Neighborhood) -> list[tuple[int, int]]:
    """Per dim, the halo's group steps (before, after) the tile: the union of the windows' offsets."""
    reach = offset_ranges(spatial, hood)  # per dim, the union of the windows' offsets, in dilated steps of r
    return [(-offsets.start // r, offsets[-1] // r) for offsets, r in zip(reach, hood.dilation, strict=True)]


def tile_sides(spatial: tuple[int, ...], hood: Neighborhood) -> tuple[TileSide, ...]:
    """The tile of each dim that costs least per query: keys scored (by real and padding queries) plus
    ``GATHER_COST`` times the rows gathered (keys, queries and outputs; none where one tile spans the grid). A tile
    spanning its dim scores all of the dim's points; smaller tiles score fewer keys each but gather them once per
    tile, with a halo."""
    choices = []
    for size, (before, after), step in zip(spatial, _halos(spatial, hood), hood.dilation, strict=True):
        longest = len(range(0, size, step))
        options = [TileSide(longest, True)] + [TileSide(t, False) for t in range(1, min(longest, MAX_TILE + 1))]
        choices.append([(o, -(-longest // o.side), longest, o.keys(before + after)) for o in options])

    def cost(combo) -> float:
        padded = math.prod(tiles * o.side / n for o, tiles, n, _ in combo)  # queries computed per real query
        scored = padded * math.prod(keys for *_, keys in combo)
        if all(o.spans for o, *_ in combo):
            return scored
        gathered_keys = math.prod(tiles * keys / n for _, tiles, n, keys in combo)
        return scored + GATHER_COST * (gathered_keys + 2 * padded)

    return tuple(o for o, *_ in min(itertools.product(*choices), key=cost))


def _flat_index(coords_per_dim: list[np.ndarray], spatial: tuple[int, ...]) -> np.ndarray:
    """The row-major flat grid indices of the product of per-dim coordinates, N = prod(spatial) where any
    coordinate is -1 (outside the grid)."""
    grids = np.meshgrid(*coords_per_dim, indexing="ij")
    outside = np.any([g < 0 for g in grids], axis=0)
    index = np.ravel_multi_index([np.maximum(g, 0) for g in grids], spatial)
    return np.where(outside, math.prod(spatial), index).ravel()


def dim_bounds_array(size: int, window: int, dilation: int, causal: bool, border: str) -> np.ndarray:
    """``neighborhood.dim_bounds`` as a NumPy array: (size, 2) int64, each position's window offsets (lo - i,
    hi - i). Evaluated in NumPy because ``torch.export`` runs this code with fake tensors, which hold no values;
    the rule is the one of ``neighborhood`` (a test checks that the two agree)."""
    i = np.arange(size)
    a = i // dilation  # index in the dilation group
    length = (size - 1 - i % dilation) // dilation + 1  # points in the group
    if causal:
        lo, hi = np.maximum(a - (window - 1), 0), a
    elif border == "shift":
        lo = np.minimum(np.maximum(a - window // 2, 0), np.maximum(length - window, 0))
        hi = np.minimum(lo + window - 1, length - 1)
    else:
        lo, hi = np.maximum(a - window // 2, 0), np.minimum(a + window // 2, length - 1)
    return np.stack([lo - a, hi - a], axis=1) * dilation


def _neighborhood_bias(combo: tuple, bounds: list[np.ndarray], padding_query: np.ndarray) -> np.ndarray:
    """(M, L) float32 of one tile: 0 where, in every dim, key j is inside the grid and lo(i) <= j - i <= hi(i)
    for query i (``bounds``: per dim, ``dim_bounds_array``), or where the query is padding; -inf elsewhere."""
    allowed = np.ones((1, 1), dtype=bool)
    for (queries, keys), table in zip(combo, bounds, strict=True):
        lo, hi = table[queries, :1], table[queries, 1:]  # (t, 1); a padding query (-1) reads a row, later ignored
        delta = keys[None, :] - queries[:, None]
        dim_ok = (keys >= 0)[None, :] & (delta >= lo) & (delta <= hi)
        allowed = (allowed[:, None, :, None] & dim_ok[None, :, None, :]).reshape(allowed.shape[0] * dim_ok.shape[0], -1)
    return np.where(allowed | padding_query[:, None], 0.0, -np.inf).astype(np.float32)


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], hood: Neighborhood, tile: int | None = None) -> Tiling:
    """The ``Tiling`` of a grid ``spatial`` for a neighborhood with a finite window; cached. ``tile``: the tile
    side in every dim (clipped to each dilation group's length), or None for ``tile_sides``."""
    lengths = [len(range(0, s, r)) for s, r in zip(spatial, hood.dilation, strict=True)]
    sides = tile_sides(spatial, hood) if tile is None else tuple(TileSide(min(tile, n), tile >= n) for n in lengths)
    bounds = [
        dim_bounds_array(s, w, r, c, hood.border)
        for s, w, r, c in zip(spatial, hood.window, hood.dilation, hood.causal, strict=True)
    ]
    per_dim = [
        _tiles_1d(s, before, after, r, side)
        for s, (before, after), r, side in zip(spatial, _halos(spatial, hood), hood.dilation, sides, strict=True)
    ]
    n = math.prod(spatial)
    queries, keys, biases = [], [], []
    for combo in itertools.product(*per_dim):
        queries.append(_flat_index([t[0] for t in combo], spatial))
        keys.append(_flat_index([t[1] for t in combo], spatial))
        biases.append(_neighborhood_bias(combo, bounds, queries[-1] == n))
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
    if np.array_equal(index, np.arange(t.shape[3])):  # every position once, in order: no gather
        return rows.reshape(*t.shape[:2], -1, per_tile, t.shape[2])
    rows = torch.cat([rows, rows.new_zeros(*rows.shape[:2], 1, rows.shape[3])], dim=2)
    picked = rows.index_select(2, torch.as_tensor(index, device=t.device))
    return picked.view(*t.shape[:2], -1, per_tile, t.shape[2])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hood: Neighborhood,
    tile: int | None = None,
) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S); ``hood`` has a
    finite window. ``tile``: the tile side in every dim, or None for the sides ``tile_sides`` chooses."""
    spatial = tuple(v.shape[3:])
    geometry = tiling(spatial, hood, tile)
    flat = [t.flatten(3) for t in (q, k, v)]
    q_t = _gather(flat[0], geometry.queries, geometry.queries_per_tile)  # (B, K, T, M, Dq)
    k_t = _gather(flat[1], geometry.keys, geometry.keys_per_tile)  # (B, K, T, L, Dq)
    v_t = _gather(flat[2], geometry.keys, geometry.keys_per_tile)  # (B, K, T, L, D)
    bias = torch.as_tensor(geometry.bias, device=q.device).to(q.dtype)
    scores = torch.matmul(q_t, k_t.transpose(-1, -2)) + bias
    z_t = torch.matmul(softmax_probs(scores, v.dtype), v_t)  # (B, K, T, M, D)
    z = z_t.flatten(2, 3)
    if not np.array_equal(geometry.queries, np.arange(geometry.position.size)):  # else: the grid, in order
        z = z.index_select(2, torch.as_tensor(geometry.position, device=v.device))  # (B, K, N, D)
    return z.transpose(2, 3).reshape(v.shape)


mix = with_convolution_term(attend)
