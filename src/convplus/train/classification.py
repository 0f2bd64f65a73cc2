"""Image classification: any timm model (optionally with Conv+ mixers), cross-entropy with optional label
smoothing / mixup / cutmix, top-1 and top-5 accuracy (%)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from ..models import load_pretrained, replace_convplus
from . import distributed, plots
from .config import TrainConfig
from .data import DataSplits, build_data
from .tasks import Task


class ClassificationTask(Task):
    name = "classification"
    train_keys = ("loss", "top1")
    val_keys = ("loss", "top1", "top5")
    best_key = "top1"
    summary_keys = ("top1", "top5")
    curve = ("top1", "top-1 accuracy (%)", (0.0, 100.0))
    sample_images = 64

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device):
        super().__init__(cfg, data, device)
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=data.num_classes,
            )
            self.loss_fn: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing:
            self.loss_fn = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()

    @staticmethod
    def build_data(cfg: TrainConfig) -> DataSplits:
        return build_data(cfg.data, cfg.img_size, cfg.seed, cfg.max_train_samples, cfg.max_val_samples)

    def build_model(self) -> nn.Module:
        """timm model (+ Conv+ replacement, + weights from a local file) for this data's classes and channels."""
        cfg = self.cfg
        kwargs = {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans, **cfg.model_kwargs}
        if cfg.drop_path:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = timm.create_model(cfg.model, pretrained=False, **kwargs)
        if cfg.pretrained_file:  # into the plain model first: the exact conversion keeps its outputs
            load_pretrained(model, cfg.pretrained_file)
        if cfg.replace_convplus:
            replace_convplus(model, stages=cfg.convplus_stages, exact=bool(cfg.pretrained_file), **cfg.convplus_kwargs)
        return model

    def step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch[0].to(self.device), batch[1].to(self.device)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with self.autocast():
            logits = model(images)
            loss = self.loss_fn(logits.float(), targets)
        hits = (logits.argmax(1) == labels).sum().item()
        return loss, {"loss": loss.item() * len(labels), "top1": 100.0 * hits, "n": len(labels)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: distributed.Context) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) over the whole validation set, summed across ranks."""
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
        for images, labels in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with self.autocast():
                logits = model(images).float()
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = topk == labels[:, None]
            totals += torch.tensor(
                [
                    F.cross_entropy(logits, labels, reduction="sum").item(),
                    hits[:, 0].sum().item(),
                    hits.any(1).sum().item(),
                    len(labels),
                ],
                dtype=torch.float64,
            )
        loss, top1, top5, count = distributed.all_reduce_sum(totals, ctx).tolist()
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}

    def inputs(self, count: int) -> torch.Tensor:
        return torch.stack([self.data.val[i][0] for i in range(min(count, len(self.data.val)))]).to(self.device)

    @torch.no_grad()
    def report(self, model: nn.Module, out: Path) -> dict[str, str]:
        """confusion_matrix.png over the validation set."""
        model.eval()
        classes = self.data.num_classes
        matrix = np.zeros((classes, classes), dtype=np.int64)
        for images, labels in DataLoader(self.data.val, 128):
            np.add.at(matrix, (labels.numpy(), model(images.to(self.device)).argmax(1).cpu().numpy()), 1)
        names = getattr(self.data.val, "classes", None)
        return {"confusion_matrix": str(plots.confusion_matrix(matrix, out / "confusion_matrix.png", names))}
