"""Semantic segmentation with any timm backbone: the semantic branch of Panoptic FPN on a timm
``features_only`` model + torchvision FPN (``convplus.models.fpn``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fpn import TimmWithFPN, timm_fpn, weights_file
from .pretrained import load_pretrained, read_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(min(32, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class SemanticFPN(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al., 2019) on ``TimmWithFPN``.

    FPN level ``i`` (stride ``4 * 2**i``) goes through ``max(i, 1)`` conv3x3-GroupNorm-ReLU stages, each
    but the finest followed by a 2x bilinear upsampling, down to the finest level's grid; the levels are
    summed, classified by a 1x1 conv and upsampled to the input size.

    Input: (B, 3, H, W) images in [0, 1] (normalised inside with ImageNet statistics, as torchvision's
    detectors do), any H and W. Output: (B, num_classes, H, W) logits.
    """

    def __init__(self, backbone: TimmWithFPN, num_classes: int, channels: int = 128):
        super().__init__()
        self.backbone = backbone
        levels = len(backbone.body.channels)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                _conv_gn_relu(backbone.out_channels if k == 0 else channels, channels) for k in range(max(i, 1))
            )
            for i in range(levels)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone((images - self.mean) / self.std).values())
        sizes = [f.shape[-2:] for f in features]
        total = 0
        for i, (feature, stages) in enumerate(zip(features, self.stages, strict=True)):
            x = feature
            for k, stage in enumerate(stages):
                x = stage(x)
                if i > 0:  # 2x up, to the next finer level's grid (exact for any H, W)
                    x = F.interpolate(x, size=sizes[i - 1 - k], mode="bilinear", align_corners=False)
            total = total + x
        logits = self.classifier(total)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def create_segmenter(
    model_name: str,
    num_classes: int,
    pretrained_file: str | Path | None = None,
    fpn_channels: int = 256,
    head_channels: int = 128,
    **timm_kwargs,
) -> SemanticFPN:
    """``SemanticFPN`` on ``timm.create_model(model_name, features_only=True, **timm_kwargs)`` + torchvision
    FPN. ``pretrained_file``: a classification checkpoint or run (the backbone's weights, see
    ``load_backbone_weights``; FPN and head start fresh) or a segmentation run's weights (the whole
    segmenter, to train further)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    whole = pretrained_file is not None and is_segmenter_checkpoint(pretrained_file)
    model = SemanticFPN(
        timm_fpn(model_name, fpn_channels, None, None if whole else pretrained_file, **timm_kwargs),
        num_classes,
        head_channels,
    )
    return load_pretrained(model, weights_file(pretrained_file)) if whole else model


def is_segmenter_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint (file or run folder) holds a whole ``SemanticFPN`` rather than a backbone."""
    keys = read_state_dict(weights_file(path))
    return any(k.startswith("backbone.fpn.") for k in keys) and any(k.startswith("classifier.") for k in keys)
