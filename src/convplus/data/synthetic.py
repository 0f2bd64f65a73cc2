"""Generated image datasets that separate local from global reasoning (``--data synthetic:NAME``).

All are 32x32 grayscale, deterministic for (name, split, seed), with balanced labels:

- ``texture`` (4 classes): horizontal, vertical, diagonal stripes or a checkerboard, with random period,
  phase, contrast and noise. Any 5x5 patch tells the class: local patterns suffice.
- ``samediff`` (2 classes): a bright or dark square at a random height at the left edge and one at the
  right edge; label = the same polarity.
- ``xor`` (2 classes): a strip of random sign at each edge; label = the signs agree.

In the two long-range tasks the two parts that decide the label are farther apart (20 px) than the 18 px
that a unit of the ablation's conv column sees: each part alone says nothing about the label.

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


STRIP = 6  # strip width (px) of the long-range tasks: the strips are 32 - 2 * STRIP = 20 px apart


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


PART_HEIGHT = 12  # px: the parts of samediff are PART_HEIGHT x STRIP rectangles


def samediff(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright (+1) or dark (-1) PART_HEIGHT x STRIP rectangle at a random height at the left edge and one at
    the right edge; label 1 when both have the same polarity. The heights are even (on the 2x2 patch grid) and
    independent: unlike ``xor``, where the decisive parts are is not fixed."""
    labels = _balanced_labels(rng, n, 2)
    first = rng.choice([-1.0, 1.0], n).astype(np.float32)
    second = np.where(labels == 1, first, -first)
    images = rng.normal(0, 0.3, (n, SIZE, SIZE)).astype(np.float32)
    top = 2 * rng.integers(0, (SIZE - PART_HEIGHT) // 2 + 1, (2, n))
    rows = np.arange(PART_HEIGHT)[None, :, None] + top[..., None, None]
    cols = np.arange(STRIP)[None, None, :]
    samples = np.arange(n)[:, None, None]
    images[samples, rows[0], cols] += first[:, None, None]
    images[samples, rows[1], SIZE - STRIP + cols] += second[:, None, None]
    return images, labels


SYNTHETIC_DATASETS: dict[str, SyntheticSpec] = {
    "texture": SyntheticSpec(4, texture, {"train": 2000, "val": 500, "test": 500}),
    "samediff": SyntheticSpec(2, samediff, {"train": 4000, "val": 1000, "test": 1000}),
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
