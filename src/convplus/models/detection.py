"""Object detection and instance segmentation with any timm backbone: torchvision's Faster / Mask R-CNN on
a timm ``features_only`` model + FPN (``convplus.models.fpn``)."""

from __future__ import annotations

import inspect
from pathlib import Path

from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .fpn import timm_fpn

DETECTOR_KWARGS = frozenset(inspect.signature(MaskRCNN.__init__).parameters) - {"self", "backbone", "num_classes"}
"""Keyword arguments that go to torchvision's Faster / Mask R-CNN (min_size, max_size, box_score_thresh, ...);
all others go to ``timm.create_model``."""


def create_detector(
    model_name: str,
    num_classes: int,
    masks: bool = False,
    pretrained_file: str | Path | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    anchor_sizes: tuple[int, ...] | None = None,
    **kwargs,
) -> FasterRCNN:
    """torchvision ``FasterRCNN`` (``masks=True``: ``MaskRCNN``) on ``timm.create_model(model_name,
    features_only=True)`` + ``FeaturePyramidNetwork`` with its ``LastLevelMaxPool`` level.

    ``num_classes`` counts object classes; the background class 0 is added here (labels are 1..num_classes).
    ``fpn_channels``: the width of the FPN levels and of the mask head; ``representation_size``: the width of
    the box head's two fully connected layers (torchvision's ``TwoMLPHead``; 1024 as torchvision's). Anchors
    are one size per FPN level, ``anchor_sizes`` (default torchvision's 32, 64, 128, ... px, for images of
    about 800 px; smaller images want smaller anchors), aspect ratios 0.5, 1, 2.
    ``kwargs``: Faster/Mask R-CNN's own (``min_size``, ``max_size``, ...; see ``DETECTOR_KWARGS``), the rest
    go to timm (e.g. ``drop_path_rate``, ``out_indices``). Input: a list of (3, H_i, W_i) images in [0, 1];
    output as torchvision's (losses in training mode, per-image boxes / labels / scores (/ masks) in eval).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, background excluded), got {num_classes}")
    detector_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in DETECTOR_KWARGS}
    body = timm_fpn(model_name, fpn_channels, LastLevelMaxPool(), pretrained_file, **kwargs)
    levels = [*map(str, range(len(body.body.channels)))]
    if anchor_sizes is None:
        anchor_sizes = tuple(32 * 2**i for i in range(len(levels) + 1))  # + the max-pool level
    if len(anchor_sizes) != len(levels) + 1:
        raise ValueError(
            f"anchor_sizes needs one size per FPN level ({len(levels) + 1}: {len(levels)} backbone levels and the "
            f"max-pool level), got {len(anchor_sizes)}"
        )
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * len(anchor_sizes)
    )
    detector_kwargs.setdefault("rpn_anchor_generator", anchors)
    detector_kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2))
    heads = {  # torchvision's heads, fpn_channels / representation_size wide; any of them may be passed instead
        "box_head": lambda: TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        "box_predictor": lambda: FastRCNNPredictor(representation_size, num_classes + 1),
    }
    if masks:
        heads |= {
            "mask_roi_pool": lambda: MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
            "mask_head": lambda: MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1),
            "mask_predictor": lambda: MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
        }
    for name, make in heads.items():
        if name not in detector_kwargs:
            detector_kwargs[name] = make()
    return (MaskRCNN if masks else FasterRCNN)(body, None, **detector_kwargs)
