"""Datasets for training: ``--data digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | synthetic:NAME``.

Every dataset yields (image (C, img_size, img_size) float tensor, int label) and comes with its number of
classes and channels. Images are normalised per dataset (ImageNet statistics for RGB folders).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FORMS = "digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | synthetic:NAME"


@dataclass
class DataSplits:
    """Train and validation datasets plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    corrupt_images: int = 0


def _digits(img_size: int) -> DataSplits:
    """scikit-learn's 1797 8x8 handwritten digits, a stratified 75/25 split, resized to img_size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(data.target)
    idx_train, idx_val = train_test_split(torch.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    return DataSplits(TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_val], y[idx_val]), 10, 1)


def _rgb_transforms(img_size: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    augment = [transforms.RandomResizedCrop(img_size, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip()]
    resize = [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    return transforms.Compose([*(augment if train else resize), transforms.ToTensor(), transforms.Normalize(mean, std)])


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # any decoder failure: the file is corrupt
        return False


def _image_folder(root: Path, img_size: int) -> DataSplits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` as laid out for ImageNet; corrupt files skipped."""
    splits, corrupt = {}, 0
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ValueError(
                f"--data imagefolder:{root}: missing folder {folder} (expected train/ and val/ class folders)"
            )
        try:
            dataset = datasets.ImageFolder(folder, transform=_rgb_transforms(img_size, split == "train"))
        except FileNotFoundError as error:
            raise ValueError(f"--data imagefolder:{root}: {error}") from error
        good = [i for i, (path, _) in enumerate(dataset.samples) if _readable(path)]
        if len(good) < len(dataset):
            bad = [p for p, _ in dataset.samples if not _readable(p)]
            warnings.warn(f"skipping {len(bad)} corrupt image(s) in {folder}: {bad[:3]}", stacklevel=2)
            corrupt += len(bad)
        if not good:
            raise ValueError(f"--data imagefolder:{root}: no readable images in {folder}")
        splits[split] = (Subset(dataset, good), len(dataset.classes))
    if splits["train"][1] != splits["val"][1]:
        raise ValueError(f"--data imagefolder:{root}: train/ and val/ have different class folders")
    return DataSplits(splits["train"][0], splits["val"][0], splits["train"][1], 3, corrupt)


def _cifar(root: Path, img_size: int, classes: int) -> DataSplits:
    """The standard python-pickle CIFAR folder (cifar-10-batches-py / cifar-100-python) under ``root``."""
    cls = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    stats = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    try:
        train = cls(root, train=True, transform=_rgb_transforms(img_size, True, *stats))
        val = cls(root, train=False, transform=_rgb_transforms(img_size, False, *stats))
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise ValueError(
            f"--data cifar{classes}:{root}: {error} (expected the python pickle folder {cls.base_folder})"
        ) from error
    return DataSplits(train, val, classes, 3)


def _synthetic(name: str, seed: int) -> DataSplits:
    synthetic = importlib.import_module("convplus.data.synthetic")
    if name not in synthetic.SYNTHETIC_DATASETS:
        raise ValueError(f"--data synthetic:{name}: unknown; available: {', '.join(synthetic.SYNTHETIC_DATASETS)}")
    spec = synthetic.SYNTHETIC_DATASETS[name]
    return DataSplits(
        synthetic.build_synthetic(name, "train", seed),
        synthetic.build_synthetic(name, "val", seed),
        spec.num_classes,
        spec.in_chans,
    )


def build_data(
    form: str, img_size: int, seed: int = 0, max_train: int | None = None, max_val: int | None = None
) -> DataSplits:
    """The datasets named by ``form`` (see ``FORMS``), optionally truncated to the first N images."""
    kind, _, arg = form.partition(":")
    if kind == "digits" and not arg:
        splits = _digits(img_size)
    elif kind in ("imagefolder", "cifar10", "cifar100") and arg:
        root = Path(arg)
        if not root.is_dir():
            raise ValueError(f"--data {form}: data folder {root} does not exist")
        splits = _image_folder(root, img_size) if kind == "imagefolder" else _cifar(root, img_size, int(kind[5:]))
    elif kind == "synthetic" and arg:
        splits = _synthetic(arg, seed)
    else:
        raise ValueError(f"--data {form!r}: unknown dataset form; expected {FORMS}")
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise ValueError(f"--data {form}: empty dataset (train {len(splits.train)}, val {len(splits.val)} images)")
    return limited(splits, max_train, max_val)


def limited(splits: DataSplits, max_train: int | None, max_val: int | None) -> DataSplits:
    """The first ``max_train`` / ``max_val`` samples of each split (all where None)."""
    for split, limit in (("train", max_train), ("val", max_val)):
        dataset = getattr(splits, split)
        if limit is not None:
            setattr(splits, split, Subset(dataset, range(min(limit, len(dataset)))))
    return splits
