"""What a task (classification, detection, segmentation) supplies to the one training loop in ``engine``.

A ``Task`` is built from the run's settings and its data (``Task.build_data(cfg)`` first). It makes the
model, turns a batch into a loss, evaluates a model on the validation loader, and draws its own pictures.
The loop around it (optimizer, schedule, EMA, DDP, checkpoints, logs, resume) is the same for every task.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed
from .config import TrainConfig
from .data import DataSplits

TASKS = {
    "classification": "convplus.train.classification:ClassificationTask",
    "detection": "convplus.train.detection:DetectionTask",
    "segmentation": "convplus.train.segmentation:SegmentationTask",
    "lm": "convplus.train.language:LanguageModelTask",
    "video": "convplus.train.video:VideoTask",
}

CLASSIFICATION_ONLY = ("mixup", "cutmix", "label_smoothing")
"""Settings that only ``--task classification`` uses (``refuse_settings`` for the others)."""


def autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context of ``--amp`` (none | bf16 | fp16) on ``device``."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    if cfg.amp not in ("bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


class Task(ABC):
    """The task-specific part of a run. Subclasses set the class attributes and implement the methods.

    ``train_keys``: per-epoch training means (``train_<key>`` in metrics.csv), ``val_keys``: validation
    metrics (``val_<key>``), ``best_key``: the validation metric that picks ``best/`` (higher is better
    unless ``lower_is_better``),
    ``summary_keys``: the metrics summary.json reports (``<key>``, ``best_<key>``, ``final_<key>``),
    ``curve``: (metric key, axis label, axis limits) of the learning curves' right panel.
    """

    name: ClassVar[str]
    train_keys: tuple[str, ...]
    val_keys: tuple[str, ...]
    best_key: str
    lower_is_better: ClassVar[bool] = False
    summary_keys: tuple[str, ...]
    curve: tuple[str, str, tuple[float, float]]
    collate: Callable | None = None
    """Batches from samples (None: PyTorch's default stacking)."""
    sample_images = 4
    """How many validation images the Conv+ layer statistics of the run folder are computed on."""

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device

    @staticmethod
    @abstractmethod
    def build_data(cfg: TrainConfig) -> DataSplits:
        """The train / validation data of ``cfg.data`` (checked: bad input raises before training)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model for ``self.data`` (``cfg.model`` names the network or backbone)."""

    @abstractmethod
    def step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise, sums over the batch of ``train_keys`` values and ``n``, the image count)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: distributed.Context) -> dict[str, float]:
        """``val_keys`` metrics over the whole validation set (all ranks' shards together)."""

    @abstractmethod
    def inputs(self, count: int) -> Any:
        """A model input of the first ``count`` validation images (FLOPs, Conv+ layer statistics)."""

    def plots(self, model: nn.Module, out: Path) -> dict[str, str]:
        """Task-specific pictures written into the run folder ``out``; name -> path."""
        return {}

    def report(self, model: nn.Module, out: Path) -> dict[str, str]:
        """The pictures ``convplus eval`` writes into ``out`` (by default those of ``plots``)."""
        return self.plots(model, out)

    @classmethod
    def improves(cls, value: float, best: float) -> bool:
        """Whether a ``best_key`` value of ``value`` beats ``best``."""
        return value < best if cls.lower_is_better else value > best

    def autocast(self):
        return autocast(self.cfg, self.device)

    def columns(self) -> tuple[str, ...]:
        """The columns of metrics.csv."""
        return (
            "epoch",
            *(f"train_{k}" for k in self.train_keys),
            *(f"val_{k}" for k in self.val_keys),
            f"ema_val_{self.best_key}",
            "lr",
            "images_per_s",
            "epoch_seconds",
        )


def refuse_settings(cfg: TrainConfig, *names: str) -> None:
    """A ValueError for the first of the settings ``names`` that is set: ``cfg.task`` does not use it."""
    for name in names:
        if getattr(cfg, name):
            raise ValueError(f"--{name.replace('_', '-')} is not used by --task {cfg.task}; leave it unset")


def task_class(name: str) -> type[Task]:
    """The ``Task`` subclass of ``--task name``."""
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: unknown; expected one of {', '.join(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
