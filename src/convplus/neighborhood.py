"""The attention neighborhood N(i) (docs/definition.md, 'Definition'), in the forms the backends need.

Per dim, with window w, dilation r and the dilation group of i (the grid points j = i mod r, at group
index a = i // r of L such points), N(i) holds the group points at group indices lo(a) .. hi(a):

    clip  (default)  lo = max(a - w // 2, 0),                       hi = min(a + w // 2, L - 1)
    shift            lo = clamp(a - w // 2, 0, max(L - w, 0)),      hi = min(lo + w - 1, L - 1)
    causal           lo = max(a - (w - 1), 0),                      hi = a

('shift' is NATTEN's border rule: near an edge the window slides inward and keeps w points; 'causal' is
NATTEN's ``is_causal``, and overrides the border.) N(i) is the product of these ranges over the dims. With
window None, N(i) is every j, or, along a causal dim, every j with j <= i.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

BORDERS = ("clip", "shift")


@dataclass(frozen=True)
class Neighborhood:
    """The geometry of both Conv+ terms on an n-d grid: the attention neighborhood N(i) and where the
    convolution term's taps sit.

    window: odd ints per dim, or None (global attention).
    dilation: ints per dim, shared by the neighborhood and the convolution kernel.
    causal: bools per dim: along a causal dim N(i) holds i and the points before it, and the convolution
        kernel's taps sit at offsets -(k - 1) * dilation .. 0 (a left-padded causal convolution).
    border: 'clip' (the window is centred on i and cut at the grid's edge) or 'shift' (NATTEN's: it slides
        inward instead); the attention term only.
    """

    window: tuple[int, ...] | None
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    border: str = "clip"

    @classmethod
    def of(
        cls,
        window: tuple[int, ...] | None,
        dilation: tuple[int, ...],
        causal: tuple[bool, ...] | None = None,
        border: str = "clip",
    ) -> Neighborhood:
        """The neighborhood with these options; causal None: no causal dim."""
        return cls(window, dilation, (False,) * len(dilation) if causal is None else causal, border)

    def covers_grid(self, spatial: tuple[int, ...]) -> bool:
        """True when N(i) is the whole grid for every i (the attention needs no mask at all)."""
        if any(c and s > 1 for c, s in zip(self.causal, spatial, strict=True)):
            return False
        return covers_grid(spatial, self.window, self.dilation)

    def kernel_reach(self, kernel_size: tuple[int, ...]) -> list[range]:
        """Per dim, the offsets j - i of the convolution kernel's taps, in tap order."""
        return [
            range(-(k - 1) * r, 1, r) if c else range(-(k // 2) * r, (k // 2) * r + 1, r)
            for k, r, c in zip(kernel_size, self.dilation, self.causal, strict=True)
        ]


def covers_grid(spatial: tuple[int, ...], window: tuple[int, ...] | None, dilation: tuple[int, ...]) -> bool:
    """True when the centred, non-causal N(i) is the whole grid for every i."""
    if window is None:
        return True
    return all(s == 1 or (r == 1 and w // 2 >= s - 1) for s, w, r in zip(spatial, window, dilation, strict=True))


def dim_bounds(size: int, window: int, dilation: int, causal: bool, border: str, device=None) -> torch.Tensor:
    """Along one dim of ``size`` points: (size, 2) int64, for each position i the offsets (lo - i, hi - i) of
    the first and last point of its window (the rule in the module docstring); the window's points are lo,
    lo + dilation, ..., hi, all inside the grid."""
    i = torch.arange(size, device=device)
    a = i // dilation  # index in the dilation group
    length = (size - 1 - i % dilation) // dilation + 1  # points in the group
    if causal:
        lo, hi = (a - (window - 1)).clamp(min=0), a
    elif border == "shift":
        lo = torch.minimum((a - window // 2).clamp(min=0), (length - window).clamp(min=0))
        hi = torch.minimum(lo + window - 1, length - 1)
    else:
        lo, hi = (a - window // 2).clamp(min=0), torch.minimum(a + window // 2, length - 1)
    return torch.stack([lo - a, hi - a], dim=1) * dilation


def grid_bounds(spatial: tuple[int, ...], hood: Neighborhood, device=None) -> list[torch.Tensor]:
    """``dim_bounds`` of every dim of the grid (a finite window)."""
    return [
        dim_bounds(s, w, r, c, hood.border, device)
        for s, w, r, c in zip(spatial, hood.window, hood.dilation, hood.causal, strict=True)
    ]


def offset_ranges(spatial: tuple[int, ...], hood: Neighborhood) -> list[range]:
    """Per dim, every offset j - i that some position's window uses (the union of the windows), in order:
    up to w // 2 dilated steps either way ('clip'), w - 1 steps back ('causal') or w - 1 steps either way
    ('shift': an edge query's window reaches w - 1 steps inward), as far as the grid reaches."""
    ranges = []
    for s, w, r, c in zip(spatial, hood.window, hood.dilation, hood.causal, strict=True):
        reach = (s - 1) // r
        back = min(w - 1 if c or hood.border == "shift" else w // 2, reach)
        ahead = 0 if c else back
        ranges.append(range(-back * r, ahead * r + 1, r))
    return ranges


def window_offsets(spatial: tuple[int, ...], hood: Neighborhood) -> list[tuple[int, ...]]:
    """All offsets j - i any position's window uses, row-major: a list of W tuples of n ints. Under 'clip'
    and 'causal' every position uses all of them that stay inside the grid; under 'shift' each position a
    window of them (``offset_validity``)."""
    return list(itertools.product(*offset_ranges(spatial, hood)))


def kernel_tap_index(
    spatial: tuple[int, ...], hood: Neighborhood, kernel_size: tuple[int, ...]
) -> tuple[int, ...] | None:
    """For the convolution term fused into a window pass: for each offset of ``window_offsets`` (in order),
    its entry in the row-major flattened kernel, -1 where the kernel has no tap. None when the kernel reaches
    grid positions no window offset reaches (the term cannot ride on that pass)."""
    windows, taps = offset_ranges(spatial, hood), hood.kernel_reach(kernel_size)
    for size, window, tap in zip(spatial, windows, taps, strict=True):
        inside = [o for o in tap if abs(o) < size]
        if inside and (inside[0] < window.start or inside[-1] > window[-1]):
            return None
    index = []
    for offset in itertools.product(*windows):
        steps = [tap.index(o) if o in tap else -1 for o, tap in zip(offset, taps, strict=True)]
        flat = 0
        for step, size in zip(steps, kernel_size, strict=True):
            flat = flat * size + step
        index.append(flat if min(steps) >= 0 else -1)
    return tuple(index)


def bounds_table(spatial: tuple[int, ...], hood: Neighborhood) -> torch.Tensor:
    """(sum(spatial), 2) int64: ``dim_bounds`` of every dim, stacked in dim order (the fused kernels' form)."""
    return torch.cat(grid_bounds(spatial, hood))


def offset_validity(
    spatial: tuple[int, ...], offsets: list[tuple[int, ...]], hood: Neighborhood, device: torch.device
) -> torch.Tensor:
    """(*S, W) bool: whether i + offset is in N(i), for each position i and offset of ``window_offsets``."""
    n = len(spatial)
    valid = torch.ones((*spatial, len(offsets)), dtype=torch.bool, device=device)
    for dim, table in enumerate(grid_bounds(spatial, hood, device)):
        shape = [spatial[dim] if d == dim else 1 for d in range(n)] + [1]
        shift = torch.tensor([o[dim] for o in offsets], device=device)
        valid = valid & (shift >= table[:, 0].view(shape)) & (shift <= table[:, 1].view(shape))
    return valid


def dim_mask(size: int, window: int | None, dilation: int, causal: bool, border: str, device) -> torch.Tensor:
    """(size, size) bool along one dim: entry (i, j) is True when j is in that dim's window of i."""
    i = torch.arange(size, device=device)
    delta = i[None, :] - i[:, None]  # j - i
    if window is None:
        return delta <= 0 if causal else torch.ones_like(delta, dtype=torch.bool)
    table = dim_bounds(size, window, dilation, causal, border, device)
    return (delta >= table[:, :1]) & (delta <= table[:, 1:]) & (delta % dilation == 0)


def neighborhood_mask(spatial: tuple[int, ...], hood: Neighborhood, device: torch.device) -> torch.Tensor:
    """(N, N) bool, N = prod(spatial), row-major: entry (i, j) is True when j is in N(i)."""
    mask = torch.ones((), dtype=torch.bool, device=device)
    windows = hood.window if hood.window is not None else (None,) * len(spatial)
    for s, w, r, c in zip(spatial, windows, hood.dilation, hood.causal, strict=True):
        d = dim_mask(s, w, r, c, hood.border, device)  # (s, s)
        mask = (mask[:, None, :, None] & d[None, :, None, :]).flatten(0, 1).flatten(1, 2) if mask.dim() else d
    return mask
