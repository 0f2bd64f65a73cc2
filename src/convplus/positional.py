"""Absolute positional encodings P of the grid (docs/definition.md, 'Definition': x^ = x + P)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_INTERPOLATION = {1: "linear", 2: "bicubic", 3: "trilinear"}


def sincos_encoding(channels: int, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Fixed n-d sine-cosine encoding, shape (channels, *spatial); see ``_sincos``. Cached per arguments outside
    torch.compile (treat the result as read-only)."""
    if torch.compiler.is_compiling():
        return _sincos(channels, spatial, dtype, device)
    return _cached_sincos(channels, spatial, dtype, device)


def _sincos(channels: int, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Fixed n-d sine-cosine encoding, shape (channels, *spatial).

    The channels are split evenly between the n dims; each dim gets pairs of sin/cos of its integer
    coordinate at geometrically spaced frequencies 1 / 10000^(f / F). Channels left over (channels not a
    multiple of 2n) are zero. Computed in float64 for float64, else in float32 and rounded to ``dtype``.
    """
    n = len(spatial)
    freqs = channels // (2 * n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    enc = torch.zeros((channels, *spatial), dtype=acc, device=device)
    if freqs == 0:
        return enc.to(dtype)
    omega = 1.0 / 10000 ** (torch.arange(freqs, dtype=acc, device=device) / freqs)
    for dim, size in enumerate(spatial):
        angle = torch.arange(size, dtype=acc, device=device)[None, :] * omega[:, None]  # (F, size)
        shape = [freqs] + [size if d == dim else 1 for d in range(n)]
        start = 2 * freqs * dim
        enc[start : start + freqs] = torch.sin(angle).view(shape)
        enc[start + freqs : start + 2 * freqs] = torch.cos(angle).view(shape)
    return enc.to(dtype)


@functools.lru_cache(maxsize=64)
def _cached_sincos(channels: int, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``_sincos``, made outside inference mode: a cached tensor first made under ``torch.inference_mode()``
    could not be saved for backward by a later training step."""
    with torch.inference_mode(False):
        return _sincos(channels, spatial, dtype, device)


def resize_learned(table: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """A learned table (C, *T) resampled to (C, *spatial) (linear / bicubic / trilinear), as timm does."""
    if tuple(table.shape[1:]) == tuple(spatial):
        return table
    mode = _INTERPOLATION[len(spatial)]
    return F.interpolate(table[None], size=spatial, mode=mode, align_corners=False)[0]
