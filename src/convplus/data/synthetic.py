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


GLYPHS = np.random.default_rng(1234).integers(0, 2, (8, 4, 4)).astype(np.float32)


def longrange(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 2)
    first = rng.integers(0, len(GLYPHS), n)
    second = np.where(labels == 1, first, (first + rng.integers(1, len(GLYPHS), n)) % len(GLYPHS))
    images = rng.normal(0, 0.3, (n, SIZE, SIZE)).astype(np.float32)
    for i in range(n):
        while True:  # two positions at least 16 px apart (Chebyshev distance)
            a, b = rng.integers(0, SIZE - 4, 2), rng.integers(0, SIZE - 4, 2)
            if np.abs(a - b).max() >= 16:
                break
        images[i, a[0] : a[0] + 4, a[1] : a[1] + 4] += 2 * GLYPHS[first[i]] - 1
        images[i, b[0] : b[0] + 4, b[1] : b[1] + 4] += 2 * GLYPHS[second[i]] - 1
    return images, labels


def _curve(rng: np.random.Generator, steps: int = 60) -> np.ndarray:
    """A smooth random walk inside the image: (steps, 2) float positions."""
    pos = rng.uniform(4, SIZE - 4, 2)
    angle = rng.uniform(0, 2 * np.pi)
    points = []
    for _ in range(steps):
        angle += rng.normal(0, 0.25)
        step = np.array([np.sin(angle), np.cos(angle)]) * 0.8
        if not (1 <= pos[0] + step[0] < SIZE - 1 and 1 <= pos[1] + step[1] < SIZE - 1):
            angle += np.pi / 2
            continue
        pos = pos + step
        points.append(pos.copy())
    return np.array(points)


def pathfinder(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 2)
    images = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        curves = [_curve(rng) for _ in range(3)]
        for curve in curves:
            dashed = curve[(np.arange(len(curve)) // 4) % 2 == 0]  # dashes of 4 steps, gaps of 4
            images[i, dashed[:, 0].astype(int), dashed[:, 1].astype(int)] = 1.0
        first = curves[0]
        end = curves[0][-1] if labels[i] == 1 else curves[1][-1]
        for y, x in (first[0].astype(int), end.astype(int)):
            images[i, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 2.0
    images += rng.normal(0, 0.1, images.shape).astype(np.float32)
    return images, labels


SYNTHETIC_DATASETS: dict[str, SyntheticSpec] = {
    "texture": SyntheticSpec(4, texture, {"train": 2000, "val": 500, "test": 500}),
    "longrange": SyntheticSpec(2, longrange, {"train": 3000, "val": 600, "test": 600}),
    "pathfinder": SyntheticSpec(2, pathfinder, {"train": 3000, "val": 600, "test": 600}),
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
