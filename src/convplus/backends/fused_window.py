"""The window geometry the fused backends ('cpu', 'triton') share: one pass over the window's offsets that
computes the attention term and, when its kernel fits in the window, the convolution term too.

The pass runs over every offset some position's window uses (``neighborhood.window_offsets``); each
position's own window is given by the bounds table, per dim and coordinate the first and last offset of
that coordinate's window (they coincide with the grid's edges except under border='shift'). Grids of 1 to
3 dims are padded to 3 dims at the front, so one kernel serves every n.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..neighborhood import Neighborhood, bounds_table, kernel_tap_index, window_offsets
from .terms import convolution_term


@dataclass(frozen=True)
class FusedWindow:
    """The window of one grid, window, dilation and kernel size, as the fused kernels take it.

    grid: the spatial size padded to 3 dims (T, H, X).
    offsets: (W, 3) int64, the offsets j - i of the window clipped to the grid, row-major.
    bounds: (T + H + X, 2) int64: for each coordinate of each (padded) dim in turn, the first and last offset
        of its window: i + offset is in N(i) when every coordinate's offset lies within these bounds.
    tap_index: (W,) int64, the row-major index of the convolution kernel's tap at each offset (-1: none), or
        None when there is no kernel or it reaches past the window (then its term runs apart: ``add_apart``).
    """

    grid: tuple[int, int, int]
    offsets: torch.Tensor
    bounds: torch.Tensor
    tap_index: torch.Tensor | None

    def add_apart(
        self, z: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor | None, hood: Neighborhood
    ) -> torch.Tensor:
        """z (B, K, D, *S) plus the convolution term of ``kernel`` on v (B, K, D, *S) when the pass did not
        fuse it (a kernel that reaches past the window); else z."""
        if kernel is None or self.tap_index is not None:
            return z
        return z + convolution_term(v, kernel, hood)


def fused_window(spatial: tuple[int, ...], hood: Neighborhood, kernel_size: tuple[int, ...] | None) -> FusedWindow:
    """The ``FusedWindow`` of a grid of size ``spatial`` (1 to 3 dims) and a finite window; ``kernel_size``
    None: no convolution kernel. Cached outside torch.compile (which traces it into constants of the graph);
    the tensors live on the CPU."""
    if torch.compiler.is_compiling():
        return _fused_window(spatial, hood, kernel_size)
    return _cached_fused_window(spatial, hood, kernel_size)


def _fused_window(spatial: tuple[int, ...], hood: Neighborhood, kernel_size: tuple[int, ...] | None) -> FusedWindow:
    """``fused_window``, computed."""
    pad = (0,) * (3 - len(spatial))
    offsets = [pad + offset for offset in window_offsets(spatial, hood)]
    index = None if kernel_size is None else kernel_tap_index(spatial, hood, kernel_size)
    bounds = torch.cat([torch.zeros(len(pad), 2, dtype=torch.int64), bounds_table(spatial, hood)])
    return FusedWindow(
        grid=(1,) * len(pad) + spatial,
        offsets=torch.tensor(offsets, dtype=torch.int64),
        bounds=bounds,
        tap_index=None if index is None else torch.tensor(index, dtype=torch.int64),
    )


@functools.lru_cache(maxsize=256)
def _cached_fused_window(
    spatial: tuple[int, ...], hood: Neighborhood, kernel_size: tuple[int, ...] | None
) -> FusedWindow:
    """``_fused_window``, made outside inference mode: a cached tensor first made under
    ``torch.inference_mode()`` could not be saved for backward by a later training step."""
    with torch.inference_mode(False):
        return _fused_window(spatial, hood, kernel_size)
