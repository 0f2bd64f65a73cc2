"""What the dense tasks (detection, segmentation) share: their data folders, settings checks and backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.shapes import shapes_root
from .config import TrainConfig
from .data import DataSplits

SHOWN = 4  # validation images in predictions.png


def data_root(cfg: TrainConfig, form: str, layout: str, forms: str) -> Path:
    """The dataset folder of ``--data form:PATH``, or of the generated shapes in their ``layout`` ('coco' or
    'ade') for ``--data synthetic:shapes``; a ValueError naming the accepted ``forms`` otherwise."""
    kind, _, path = cfg.data.partition(":")
    if kind == form and path:
        return Path(path)
    if cfg.data == "synthetic:shapes":
        return shapes_root(cfg.seed) / layout
    raise ValueError(f"--data {cfg.data!r}: not a {cfg.task} dataset; expected {forms}")


def check_dense_settings(cfg: TrainConfig) -> None:
    """Classification-only settings are refused for dense tasks rather than ignored."""
    for name in ("mixup", "cutmix", "label_smoothing"):
        if getattr(cfg, name):
            raise ValueError(f"--{name.replace('_', '-')} is for --task classification, not {cfg.task}")


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm network inside a detector or segmenter (under the FPN)."""
    return model.backbone.body.body


def limited(splits: DataSplits, cfg: TrainConfig) -> DataSplits:
    """The first --max-train-samples / --max-val-samples of each split (all where unset)."""
    for split, limit in (("train", cfg.max_train_samples), ("val", cfg.max_val_samples)):
        dataset = getattr(splits, split)
        if limit is not None:
            setattr(splits, split, torch.utils.data.Subset(dataset, range(min(limit, len(dataset)))))
    return splits
