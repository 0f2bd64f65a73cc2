"""``ade20k:PATH``: semantic segmentation data in the ADEChallengeData2016 layout.

``PATH/images/{training,validation}/<name>.jpg`` with ``PATH/annotations/{training,validation}/<name>.png``
label maps: 0 = ignore, 1..C the classes (C = 150 for ADE20K itself, recognised by its
``objectInfo150.txt`` or folder name; for any other folder the largest label found, or ``num_classes``).
Targets are ``label - 1`` with 0 becoming ``IGNORE`` (as mmsegmentation's ``reduce_zero_label``).

Transforms v2 move image and label map together: training takes a random rescale (shorter side
img_size/2 .. 2*img_size), a random img_size x img_size crop (padding labels with ``IGNORE``) and a flip;
evaluation resizes the shorter side to img_size, keeping the aspect ratio. Checked before training, each
error naming the file: missing folders, an image without its label map, a label above C. Images or label
maps that do not decode are skipped, counted and reported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..train.data import DataSplits, _readable

IGNORE = 255
ADE20K_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}


class SegmentationFolder(Dataset):
    """(image (3, H, W) float in [0, 1], target (H, W) int64 in 0..C-1 or ``IGNORE``) for (jpg, png) pairs."""

    def __init__(self, pairs: list[tuple[Path, Path]], img_size: int, train: bool):
        self.pairs = pairs
        if train:
            steps = [
                v2.RandomResize(img_size // 2, 2 * img_size),
                v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Mask: IGNORE, "others": 0}),
                v2.RandomHorizontalFlip(),
            ]
        else:
            steps = [v2.Resize(img_size)]
        self.transforms = v2.Compose(
            [*steps, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = tv_tensors.Image(np.asarray(Image.open(image_path).convert("RGB")).transpose(2, 0, 1).copy())
        label = torch.from_numpy(np.asarray(Image.open(label_path)).astype(np.int64))
        target = tv_tensors.Mask(torch.where(label == 0, IGNORE, label - 1))
        image, target = self.transforms(image, target)
        return image, target.as_subclass(torch.Tensor)


def _largest_label(path: Path) -> int | None:
    """The largest label of a label map, or None if it does not decode."""
    try:
        with Image.open(path) as image:
            return int(np.asarray(image).max())
    except Exception:  # any decoder failure: a corrupt file
        return None


def _pairs(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[int | None]]:
    images, labels = root / "images" / SPLITS[split], root / "annotations" / SPLITS[split]
    for folder in (images, labels):
        if not folder.is_dir():
            raise ValueError(f"ade20k:{root}: missing folder {folder} (expected the ADEChallengeData2016 layout)")
    pairs = []
    for image in sorted(images.glob("*.jpg")):
        label = labels / f"{image.stem}.png"
        if not label.is_file():
            raise ValueError(f"ade20k:{root}: image {image} has no label map {label}")
        pairs.append((image, label))
    if not pairs:
        raise ValueError(f"ade20k:{root}: no .jpg images in {images}")
    return pairs, [_largest_label(label) for _, label in pairs]


def load_ade20k(root: Path, img_size: int, num_classes: int | None = None) -> DataSplits:
    """Train and validation splits of ``root`` (see the module docstring)."""
    if not root.is_dir():
        raise ValueError(f"ade20k:{root}: data folder does not exist")
    found = {split: _pairs(root, split) for split in SPLITS}
    if num_classes is None and ((root / "objectInfo150.txt").is_file() or root.name == "ADEChallengeData2016"):
        num_classes = ADE20K_CLASSES
    if num_classes is None:
        num_classes = max(m for _, largest in found.values() for m in largest if m is not None)
    splits, corrupt = {}, 0
    for split, (pairs, largest) in found.items():
        for (_, label), top in zip(pairs, largest, strict=True):
            if top is not None and top > num_classes:
                raise ValueError(f"{label}: label {top} outside [0, {num_classes}] (0 = ignore, 1..{num_classes})")
        good = [pair for pair, top in zip(pairs, largest, strict=True) if top is not None and _readable(str(pair[0]))]
        if len(good) < len(pairs):
            kept = set(good)
            bad = [f"{image} / {label.name}" for image, label in pairs if (image, label) not in kept]
            warnings.warn(f"skipping {len(pairs) - len(good)} corrupt image(s) in {root}: {bad[:3]}", stacklevel=2)
            corrupt += len(pairs) - len(good)
        if not good:
            raise ValueError(f"ade20k:{root}: no readable images for {SPLITS[split]}")
        splits[split] = SegmentationFolder(good, img_size, train=split == "train")
    if num_classes < 1:
        raise ValueError(f"ade20k:{root}: no class labels (all label maps are 0 = ignore)")
    return DataSplits(splits["train"], splits["val"], num_classes, 3, corrupt)
