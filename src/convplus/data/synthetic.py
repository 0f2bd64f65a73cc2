"""Generated image datasets that separate local from global reasoning (``--data synthetic:NAME``).

All are 32x32 grayscale, deterministic for (name, split, seed), with balanced labels:

- ``texture`` (4 classes): horizontal, vertical, diagonal stripes or a checkerboard, with random period,
  phase, contrast and noise. Any 5x5 patch tells the class: local patterns suffice.
- ``longrange`` (2 classes): two 4x4 glyphs (from 8) placed far apart (>= 16 px); label = same glyph. A
  patch that sees one glyph says nothing about the other: it needs global context.
- ``pathfinder`` (2 classes): two dots and dashed curves among distractor curves; label = the dots lie on the
  same curve (in the style of the Long Range Arena Pathfinder task).

Cards with sizes and generation details: docs/datasets/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

SIZE = 32
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SyntheticSpec:
    """A generated dataset: classes, channels, image size, images per split, generator."""

    num_classes: int
    generate: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    sizes: dict[str, int]
    in_chans: int = 1
    img_size: int = SIZE


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes)


def texture(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 4)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period = rng.uniform(3.0, 6.0, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    coords = np.stack([yy, xx, (xx + yy) / np.sqrt(2)])  # horizontal, vertical, diagonal
    stripes = np.sin(2 * np.pi * coords[np.minimum(labels, 2)] / period + phase)
    checker = np.sin(2 * np.pi * yy / period + phase) * np.sin(2 * np.pi * xx / period)
    images = np.where((labels == 3)[:, None, None], np.sign(checker), stripes)
    images = images * rng.uniform(0.5, 1.0, (n, 1, 1)) + rng.normal(0, 0.4, images.shape)
    return images.astype(np.float32), labels


GLYPH = 6  # glyph side (px): 3x3 blocks of 2x2 pixels
GLYPHS = np.kron(
    np.array(
        [
            [[1, 1, 1], [1, -1, 1], [1, 1, 1]],  # ring
            [[-1, 1, -1], [1, 1, 1], [-1, 1, -1]],  # plus
            [[1, -1, 1], [-1, 1, -1], [1, -1, 1]],  # x
            [[1, 1, 1], [-1, -1, -1], [1, 1, 1]],  # bars
        ],
        np.float32,
    ),
    np.ones((2, 2), np.float32),
)
MIN_GAP = 19  # px between the nearest pixels of the two far-apart parts (more than an 18 px receptive field)


def samediff(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 6x6 glyphs (from 4) in one random row of the 2-px block grid, at the left and the right edge,
    at least MIN_GAP px apart; label 1 when they are the same glyph."""
    labels = _balanced_labels(rng, n, 2)
    first = rng.integers(0, len(GLYPHS), n)
    second = np.where(labels == 1, first, (first + rng.integers(1, len(GLYPHS), n)) % len(GLYPHS))
    images = rng.normal(0, 0.2, (n, SIZE, SIZE)).astype(np.float32)
    left = 2 * rng.integers(0, (SIZE - 2 * GLYPH - MIN_GAP) // 2 + 1, n)  # left glyph's first column
    rows = 2 * rng.integers(0, (SIZE - GLYPH) // 2 + 1, n)
    swap = rng.integers(0, 2, n).astype(bool)  # which glyph sits on the left
    for i in range(n):
        a, b = (second[i], first[i]) if swap[i] else (first[i], second[i])
        right = SIZE - GLYPH - 2 * rng.integers(0, (SIZE - 2 * GLYPH - MIN_GAP - left[i]) // 2 + 1)
        images[i, rows[i] : rows[i] + GLYPH, left[i] : left[i] + GLYPH] += GLYPHS[a]
        images[i, rows[i] : rows[i] + GLYPH, right : right + GLYPH] += GLYPHS[b]
    return images, labels


STRIP = 6  # strip width (px); the strips are 2x2-pixel blocks of +-1


def copy(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A random strip at the left edge and one at the right edge, SIZE - 2 * STRIP px apart; label 1 when the
    right strip is a copy of the left one, 0 when it is drawn independently."""
    labels = _balanced_labels(rng, n, 2)
    blocks = rng.choice([-1.0, 1.0], (2, n, SIZE // 2, STRIP // 2)).astype(np.float32)
    right = np.where((labels == 1)[:, None, None], blocks[0], blocks[1])
    strips = [np.kron(part, np.ones((1, 2, 2), np.float32)) for part in (blocks[0], right)]
    images = rng.normal(0, 0.2, (n, SIZE, SIZE)).astype(np.float32)
    images[:, :, :STRIP] += strips[0]
    images[:, :, SIZE - STRIP :] += strips[1]
    return images, labels


def xor(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A strip of STRIP px at the left edge and one at the right edge, each of one random sign; label 1 when
    the signs agree (the exclusive-or of two parts SIZE - 2 * STRIP px apart)."""
    labels = _balanced_labels(rng, n, 2)
    left = rng.choice([-1.0, 1.0], n).astype(np.float32)
    right = np.where(labels == 1, left, -left)
    images = rng.normal(0, 0.3, (n, SIZE, SIZE)).astype(np.float32)
    images[:, :, :STRIP] += left[:, None, None]
    images[:, :, SIZE - STRIP :] += right[:, None, None]
    return images, labels


SYNTHETIC_DATASETS: dict[str, SyntheticSpec] = {
    "texture": SyntheticSpec(4, texture, {"train": 2000, "val": 500, "test": 500}),
    "samediff": SyntheticSpec(2, samediff, {"train": 4000, "val": 1000, "test": 1000}),
    "copy": SyntheticSpec(2, copy, {"train": 4000, "val": 1000, "test": 1000}),
    "xor": SyntheticSpec(2, xor, {"train": 4000, "val": 1000, "test": 1000}),
}


def generate(name: str, split: str, seed: int = 0, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw images (N, 32, 32) float32 and labels (N,) of a split (another split draws another stream)."""
    if name not in SYNTHETIC_DATASETS:
        raise ValueError(f"synthetic dataset must be one of {', '.join(SYNTHETIC_DATASETS)}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    spec = SYNTHETIC_DATASETS[name]
    rng = np.random.default_rng([seed, SPLITS[split], sorted(SYNTHETIC_DATASETS).index(name)])
    return spec.generate(rng, size or spec.sizes[split])


def build_synthetic(name: str, split: str, seed: int = 0) -> TensorDataset:
    """A split as a dataset of (image (1, 32, 32) float tensor, int label)."""
    images, labels = generate(name, split, seed)
    return TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())
