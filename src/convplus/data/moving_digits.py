"""``synthetic:moving-digits``: clips of one handwritten digit moving across the frame; the label needs the
motion.

A clip is (1, T, size, size): scikit-learn's 8x8 digit, scaled 2x to 16x16, on a black frame, moving by
``speed`` pixels per frame (1, 2 or 3) in one of four directions (right, left, down, up), wrapping around
the frame's edges, plus Gaussian noise (std 0.1). Label = 4 * (digit parity: 0 even, 1 odd) + direction:
8 balanced classes.

The start position is uniform over the frame and the motion wraps around, so every single frame has the
same distribution whatever the direction: one frame tells the parity but nothing about the direction (a
classifier of single frames is at chance, 1/4, on the direction). Training clips use the digits whose index
is not a multiple of 4, validation and test clips the others (no digit image is shared across splits).
Clips are generated on access, deterministically from (seed, split, index). Card: docs/datasets/moving-digits.md.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx): right, left, down, up
DIRECTION_NAMES = ("right", "left", "down", "up")
NUM_CLASSES = 2 * len(DIRECTIONS)
SPLITS = {"train": 0, "val": 1, "test": 2}
SIZES = {"train": 4000, "val": 800, "test": 800}
SPEEDS = (1, 2, 3)
NOISE = 0.1
MEAN, STD = 0.07, 0.24  # pixel statistics used to normalise the clips


@functools.cache
def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """16x16 digit images in [0, 1] (N, 16, 16) float32 and their digits (N,) of a split's share."""
    from sklearn.datasets import load_digits

    data = load_digits()
    held_out = np.arange(len(data.target)) % 4 == 0
    keep = ~held_out if split == "train" else held_out
    images = np.kron(data.images[keep] / 16.0, np.ones((2, 2))).astype(np.float32)
    return images, data.target[keep]


def clip(rng: np.random.Generator, glyph: np.ndarray, direction: int, frames: int, size: int) -> np.ndarray:
    """(frames, size, size) float32: ``glyph`` moving in ``direction`` (an index of ``DIRECTIONS``) at a random
    speed from a uniformly random start, wrapping around, plus noise."""
    if size < glyph.shape[0]:
        raise ValueError(f"frame size {size} is smaller than the {glyph.shape[0]}-pixel digit")
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[: glyph.shape[0], : glyph.shape[1]] = glyph
    start = rng.integers(0, size, 2)
    step = np.array(DIRECTIONS[direction]) * rng.choice(SPEEDS)
    video = np.stack([np.roll(canvas, tuple(start + t * step), axis=(0, 1)) for t in range(frames)])
    return video + rng.normal(0, NOISE, video.shape).astype(np.float32)


class MovingDigits(Dataset):
    """(clip (1, frames, size, size) float tensor, normalised; label in [0, 8)) for ``split``."""

    classes: ClassVar[list[str]] = [f"{parity} {name}" for parity in ("even", "odd") for name in DIRECTION_NAMES]

    def __init__(self, split: str, frames: int = 8, size: int = 32, seed: int = 0, count: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.split, self.frames, self.size, self.seed = split, frames, size, seed
        self.count = SIZES[split] if count is None else count
        self.images, self.digits = _digits(split)

    def __len__(self) -> int:
        return self.count

    def label_parts(self, index: int) -> tuple[int, int]:
        """(parity, direction) of clip ``index``: balanced over the split."""
        return (index // len(DIRECTIONS)) % 2, index % len(DIRECTIONS)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        parity, direction = self.label_parts(index)
        candidates = np.flatnonzero(self.digits % 2 == parity)
        glyph = self.images[rng.choice(candidates)]
        video = clip(rng, glyph, direction, self.frames, self.size)
        return torch.from_numpy((video - MEAN) / STD).unsqueeze(0), len(DIRECTIONS) * parity + direction
