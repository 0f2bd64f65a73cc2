"""Video classification: classification (``ClassificationTask``: loss, top-1 / top-5, confusion matrix) of
clips (B, 1, T, H, W) from ``--data synthetic:moving-digits`` (``--frames`` T, ``--img-size`` H = W) with a
``convplus.models.video`` network (``--model convplus_video_tiny``, ``conv_video_tiny``, ...)."""

from __future__ import annotations

import torch

from ..data.moving_digits import NUM_CLASSES, MovingDigits
from .classification import ClassificationTask
from .config import TrainConfig
from .data import DataSplits, limited
from .tasks import refuse_settings

FORMS = "synthetic:moving-digits"


class VideoTask(ClassificationTask):
    name = "video"

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device):
        refuse_settings(cfg, "cutmix", "replace_convplus", "pretrained_file")  # image-only settings
        super().__init__(cfg, data, device)

    @staticmethod
    def build_data(cfg: TrainConfig) -> DataSplits:
        if cfg.data != FORMS:
            raise ValueError(f"--data {cfg.data!r}: not a video dataset; expected {FORMS}")
        train, val = (MovingDigits(split, cfg.frames, cfg.img_size, cfg.seed) for split in ("train", "val"))
        return limited(DataSplits(train, val, NUM_CLASSES, 1), cfg.max_train_samples, cfg.max_val_samples)
