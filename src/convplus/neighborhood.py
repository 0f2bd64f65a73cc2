"""The attention neighborhood N(i) (docs/definition.md, 'Definition'), in the two forms the backends need.

N(i) = grid points j with |j - i| <= (w // 2) * dilation in every dim, j - i a multiple of the dilation,
j inside the grid; all j when the window is None.
"""

from __future__ import annotations

import functools
import itertools

import torch


def reachable_halves(spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Per dim, how many dilated steps of the window can land inside a grid of size ``spatial``.

    A window larger than the grid is clipped: offsets that leave the grid from every position are dropped.
    """
    return tuple(min(w // 2, (s - 1) // r) for s, w, r in zip(spatial, window, dilation, strict=True))


def covers_grid(spatial: tuple[int, ...], window: tuple[int, ...] | None, dilation: tuple[int, ...]) -> bool:
    """True when N(i) is the whole grid for every i (the neighborhood attention is global attention)."""
    if window is None:
        return True
    return all(s == 1 or (r == 1 and w // 2 >= s - 1) for s, w, r in zip(spatial, window, dilation, strict=True))


def window_offsets(halves: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All offsets j - i of a (clipped) window, row-major: a list of W tuples of n ints."""
    ranges = [range(-h * r, h * r + 1, r) for h, r in zip(halves, dilation, strict=True)]
    return list(itertools.product(*ranges))


@functools.lru_cache(maxsize=256)
def kernel_tap_index(
    spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...], kernel_size: tuple[int, ...]
) -> tuple[int, ...] | None:
    """For the convolution term fused into a window pass: for each offset of the clipped window (in
    ``window_offsets`` order), its entry in the row-major flattened (dilated) kernel, -1 where the kernel has no
    tap. None when the kernel reaches grid positions outside the window (the term cannot ride on that pass)."""
    halves = reachable_halves(spatial, window, dilation)
    if any(r > h for r, h in zip(reachable_halves(spatial, kernel_size, dilation), halves, strict=True)):
        return None
    index = []
    for offset in window_offsets(halves, dilation):
        steps = [o // r + k // 2 for o, r, k in zip(offset, dilation, kernel_size, strict=True)]
        flat = 0
        for step, size in zip(steps, kernel_size, strict=True):
            flat = flat * size + step
        inside = all(0 <= step < size for step, size in zip(steps, kernel_size, strict=True))
        index.append(flat if inside else -1)
    return tuple(index)


def offset_validity(spatial: tuple[int, ...], offsets: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """(*S, W) bool: whether position i + offset lies inside the grid, for each position and offset."""
    n = len(spatial)
    valid = torch.ones((*spatial, len(offsets)), dtype=torch.bool, device=device)
    for dim, size in enumerate(spatial):
        coord = torch.arange(size, device=device).view([size if d == dim else 1 for d in range(n)] + [1])
        shift = torch.tensor([o[dim] for o in offsets], device=device)
        target = coord + shift
        valid = valid & (target >= 0) & (target < size)
    return valid


def neighborhood_mask(
    spatial: tuple[int, ...], window: tuple[int, ...], dilation: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """(N, N) bool, N = prod(spatial), row-major: entry (i, j) is True when j is in N(i)."""
    grids = torch.meshgrid(*[torch.arange(s, device=device) for s in spatial], indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (N, n)
    delta = coords[None, :, :] - coords[:, None, :]  # (N, N, n): j - i
    reach = torch.tensor([(w // 2) * r for w, r in zip(window, dilation, strict=True)], device=device)
    step = torch.tensor(dilation, device=device)
    return ((delta.abs() <= reach) & (delta % step == 0)).all(dim=-1)
