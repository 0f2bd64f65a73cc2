"""Semantic segmentation: a semantic FPN head on the ``--model`` backbone + FPN, per-pixel cross-entropy
(ignoring unlabelled pixels, averaged per image), evaluated with mIoU and pixel accuracy from one confusion
matrix summed over all ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import draw_segmentation_masks

from ..data.ade20k import IGNORE, load_ade20k
from ..models import create_segmenter, replace_convplus
from . import distributed, plots
from .config import TrainConfig
from .data import DataSplits, limited
from .dense import SHOWN, backbone_of, data_root
from .metrics import confusion_matrix, segmentation_scores
from .tasks import CLASSIFICATION_ONLY, Task, refuse_settings

FORMS = "ade20k:PATH | synthetic:shapes"


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) images and (B, H, W) labels, padded at the bottom / right to the largest image (labels
    with ``IGNORE``): evaluation keeps each image's aspect ratio."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), 3, height, width)
    labels = torch.full((len(batch), height, width), IGNORE, dtype=torch.int64)
    for i, (image, label) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        labels[i, : label.shape[-2], : label.shape[-1]] = label
    return images, labels


def per_image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy of each image, averaged over its labelled pixels. Their mean weighs every image
    alike, whichever rank holds it, so N processes follow the gradient of one."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    return per_pixel.sum((1, 2)) / (labels != IGNORE).sum((1, 2)).clamp(min=1)


class SegmentationTask(Task):
    name = "segmentation"
    train_keys = ("loss",)
    val_keys = ("loss", "miou", "pixel_acc")
    best_key = "miou"
    summary_keys = ("miou", "pixel_acc")
    curve = ("miou", "mIoU (fraction)", (0.0, 1.0))
    collate = staticmethod(collate)

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device):
        super().__init__(cfg, data, device)
        refuse_settings(cfg, *CLASSIFICATION_ONLY)

    @staticmethod
    def build_data(cfg: TrainConfig) -> DataSplits:
        return limited(
            load_ade20k(data_root(cfg, "ade20k", "ade", FORMS), cfg.img_size, cfg.num_classes),
            cfg.max_train_samples,
            cfg.max_val_samples,
        )

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        kwargs = {**cfg.model_kwargs, **({"drop_path_rate": cfg.drop_path} if cfg.drop_path else {})}
        model = create_segmenter(cfg.model, self.data.num_classes, cfg.pretrained_file, **kwargs)
        if cfg.replace_convplus:
            replace_convplus(backbone_of(model), stages=cfg.convplus_stages, **cfg.convplus_kwargs)
        return model

    def step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch[0].to(self.device), batch[1].to(self.device)
        with self.autocast():
            logits = model(images)
        loss = per_image_loss(logits.float(), labels).mean()
        return loss, {"loss": loss.item() * len(images), "n": len(images)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: distributed.Context) -> dict[str, float]:
        """Mean per-image loss; mIoU and pixel accuracy of the confusion matrix over all validation pixels."""
        model.eval()
        classes = self.data.num_classes
        matrix = torch.zeros(classes, classes, dtype=torch.float64)
        loss = torch.zeros(2, dtype=torch.float64)  # loss sum, images
        for images, labels in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with self.autocast():
                logits = model(images).float()
            matrix += confusion_matrix(logits.argmax(1), labels, classes, IGNORE).cpu().double()
            loss += torch.tensor([per_image_loss(logits, labels).sum().item(), len(images)], dtype=torch.float64)
        matrix = distributed.all_reduce_sum(matrix, ctx)
        loss_sum, count = distributed.all_reduce_sum(loss, ctx).tolist()
        scores = segmentation_scores(matrix)
        return {"loss": loss_sum / count, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}

    def inputs(self, count: int) -> torch.Tensor:
        batch = [self.data.val[i] for i in range(min(count, len(self.data.val)))]
        return collate(batch)[0].to(self.device)

    @torch.no_grad()
    def plots(self, model: nn.Module, out: Path) -> dict[str, str]:
        """predictions.png: validation images with the ground-truth classes beside the predicted ones."""
        model.eval()
        images, labels = collate([self.data.val[i] for i in range(min(SHOWN, len(self.data.val)))])
        predicted = model(images.to(self.device)).argmax(1).cpu()
        classes = torch.arange(self.data.num_classes)[:, None, None]
        colors = plots.palette(self.data.num_classes)
        rows = []
        for image, label, prediction in zip(images, labels, predicted, strict=True):
            canvas = (image * 255).to(torch.uint8)
            drawn = [draw_segmentation_masks(canvas, m[None] == classes, 0.6, colors) for m in (label, prediction)]
            rows.append([canvas, *drawn])
        path = plots.image_grid(rows, out / "predictions.png", ["image", "ground truth", "prediction"])
        return {"predictions": str(path)}
