"""What the dense tasks (detection, segmentation) share: their data folders and backbone."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..data.shapes import shapes_root
from .config import TrainConfig

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


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm network inside a detector or segmenter (under the FPN)."""
    return model.backbone.body.body
