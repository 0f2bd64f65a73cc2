"""Run the ablation: every variant x seed on each task, through the trainer; collect per-seed records.

Each run is ``convplus.train.train`` of the ``convplus_ablation`` model. ``conv-to-convplus`` starts from
the same seed's trained ``conv`` run (``--pretrained-file`` + ``--replace-convplus``: an exact conversion)
and fine-tunes for as many epochs as the others train. A finished run of the same settings in the output
folder is reused (an interrupted study goes on where it stopped; a task added to the suite trains only its
own runs). Runs of different (task, seed) pairs are independent
and go to ``workers`` processes of one thread each; a seed's runs share its data order (paired comparison).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch

from ..train import TrainConfig, finished_summary, train
from ..train.engine import build_data
from .backbones import grid_sizes, receptive_field
from .variants import VARIANT_NAMES, Variant, variants


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite: its data, what decides it, the level some variant must reach to keep it, and
    its training length."""

    data: str
    decided_by: str  # 'local statistics', 'long range' or 'shape' (segmentation)
    level: float  # the score (%) that the best variant must reach for the task to separate anything
    chance: float  # chance, or the best score (%) of a model that sees no two decisive parts at once
    epochs: int
    max_train_samples: int | None = None
    batch_size: int = 32
    backbone: str = "isotropic"
    description: str = ""  # what the images show and what decides the label (the report's method section)
    task: str = "classification"  # or 'segmentation' (the backbone under a semantic FPN head, scored by mIoU)
    img_size: int = 32
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # backbone settings for this task (BACKBONES')
    head_kwargs: dict[str, Any] = field(default_factory=dict)  # the segmenter's FPN and head widths

    @property
    def metric(self) -> str:
        """The record key of the task's score (%): 'top1', or 'miou' for segmentation."""
        return "miou" if self.task == "segmentation" else "top1"


TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec(
        "digits",
        "local statistics",
        90.0,
        10.0,
        epochs=8,
        backbone="hierarchical",
        description="scikit-learn's 8x8 digits, resized",
    ),
    "texture": TaskSpec(
        "synthetic:texture",
        "local statistics",
        90.0,
        25.0,
        epochs=3,
        max_train_samples=800,
        description="stripes and checkerboards; any 5x5 patch tells the class",
    ),
    "xor": TaskSpec(
        "synthetic:xor",
        "long range",
        90.0,
        75.0,
        epochs=3,
        max_train_samples=1500,
        description="two strips of random sign 20 px apart, label = the signs agree; fixed positions",
    ),
    "samediff": TaskSpec(
        "synthetic:samediff",
        "long range",
        90.0,
        75.0,
        epochs=4,
        max_train_samples=2000,
        description="a bright or dark 12x6 rectangle at a random height at each edge, 20 px apart, label = the "
        "same polarity; the parts move",
    ),
    "shapes": TaskSpec(
        "synthetic:shapes",
        "shape",
        20.0,
        14.2,  # the mIoU of predicting the background everywhere (85.3% of seed 0's validation pixels)
        epochs=30,
        batch_size=16,
        description="semantic segmentation (mIoU, %) of the generated scenes of 5 kinds of shapes at 64x64 "
        "(shapes 5-28 px across): a pixel's class is the shape it lies in, decided by that shape's outline",
        task="segmentation",
        img_size=64,
        model_kwargs={"patch_size": 4},  # 16x16 cells, as the other tasks' grids
        head_kwargs={"fpn_channels": 32, "head_channels": 32},  # a head small beside the 24-wide column
    ),
}


@dataclass(frozen=True)
class Recipe:
    """Training settings shared by every variant (the task sets the epochs and batch size unless given)."""

    batch_size: int | None = None
    lr: float = 3e-3
    epochs: int | None = None
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    backbone: str | None = None  # None: each task's own
    heads: int = 1


FULL = Recipe(max_val_samples=500)
QUICK = Recipe(epochs=1, max_train_samples=64, max_val_samples=32)


def task_spec(task: str) -> TaskSpec:
    """A suite task by name, or user data (``cifar10:PATH``, ``imagefolder:PATH``) trained for 10 epochs."""
    if task in TASKS:
        return TASKS[task]
    kind = task.partition(":")[0]
    if kind not in ("cifar10", "cifar100", "imagefolder"):
        raise ValueError(f"--task must be one of {', '.join(TASKS)} or all; --data cifar10:PATH | imagefolder:PATH")
    return TaskSpec(task, "user data", math.nan, math.nan, epochs=10)


def backbone_of(task: str, recipe: Recipe) -> str:
    """The backbone a task runs on: the recipe's if it names one, else the task's."""
    return recipe.backbone or task_spec(task).backbone


def config(task: str, variant: Variant, seed: int, recipe: Recipe, root: Path) -> TrainConfig:
    """The trainer settings of one run (its folder: root/task/variant/seed<seed>)."""
    spec = task_spec(task)
    model_kwargs = {"backbone": backbone_of(task, recipe), "mixer": variant.mixer, "frozen_gain": variant.frozen_gain}
    if variant.mixer_kwargs:
        model_kwargs["mixer_kwargs"] = variant.mixer_kwargs
    cfg = TrainConfig(
        model="convplus_ablation",
        task=spec.task,
        data=spec.data,
        img_size=spec.img_size,
        epochs=recipe.epochs or spec.epochs,
        batch_size=recipe.batch_size or spec.batch_size,
        lr=recipe.lr,
        warmup_epochs=1,
        seed=seed,
        output=str(root / slug(task) / variant.name / f"seed{seed}"),
        overwrite=True,
        quiet=True,
        model_kwargs={**model_kwargs, **spec.model_kwargs, **spec.head_kwargs},
        max_train_samples=recipe.max_train_samples or spec.max_train_samples,
        max_val_samples=recipe.max_val_samples,
    )
    if variant.finetune_from:
        source = root / slug(task) / variant.finetune_from / f"seed{seed}" / "last" / "model.safetensors"
        cfg = replace(
            cfg,
            pretrained_file=str(source),
            replace_convplus=True,
            convplus_kwargs=variant.convert_kwargs,
        )
    return cfg


def slug(task: str) -> str:
    """A folder name for a task or a user data form."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in task)


def architecture(task: str, variant: Variant, recipe: Recipe) -> dict:
    """Receptive field (px) and stage grid sides of a variant's model on the task's images."""
    cfg = config(task, variant, 0, recipe, Path("."))
    in_chans = build_data(replace(cfg, max_train_samples=1, max_val_samples=1)).in_chans
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k not in task_spec(task).head_kwargs}
    if variant.finetune_from:  # the converted model: the plain one, then Conv+ with the conversion's window
        kwargs = {**kwargs, "mixer": "convplus", "mixer_kwargs": variant.convert_kwargs}
    model = timm.create_model(cfg.model, num_classes=2, in_chans=in_chans, **kwargs)
    return {
        "receptive_field": receptive_field(model, cfg.img_size, in_chans),
        "grids": grid_sizes(model, cfg.img_size, in_chans),
    }


def run_variant(task: str, variant: Variant, seed: int, recipe: Recipe, root: Path) -> tuple[dict, list]:
    """Train one variant with one seed: its record (results.json) and its per-epoch Conv+ layer history."""
    cfg = config(task, variant, seed, recipe, root)
    summary = finished_summary(cfg) or train(cfg)
    history_file = Path(cfg.output) / "convplus_layers_epochs.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    with open(Path(cfg.output) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metric = task_spec(task).metric
    record = {
        "task": task,
        "variant": variant.name,
        "seed": seed,
        "metric": metric,
        metric: summary[f"final_{metric}"] * (100 if metric == "miou" else 1),  # as a percentage
        "params": summary["params"],
        "train_seconds": summary["wall_seconds"],
        "images_per_second": statistics.fmean(float(row["images_per_s"]) for row in rows),  # training steps
        "epochs": cfg.epochs,
        "backbone": backbone_of(task, recipe),
    }
    return record, history


def _run_seed(task: str, seed: int, recipe: Recipe, root: Path, names: tuple[str, ...]) -> list[tuple[dict, list]]:
    """Every selected variant on one (task, seed), in order ('conv' before the model converted from it)."""
    done = []
    for variant in variants(backbone_of(task, recipe), recipe.heads):
        if variant.name in names:
            record, history = run_variant(task, variant, seed, recipe, root)
            print(
                f"{task:10s} {variant.name:18s} seed {seed}: {record['metric']} {record[record['metric']]:6.2f}%  "
                f"{record['train_seconds']:6.1f}s",
                flush=True,
            )
            done.append((record, history))
    return done


def single_thread_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` fresh processes of one thread each (small models: threads would only contend)."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    )


def run_suite(
    tasks: list[str], seeds: int, recipe: Recipe, root: Path, workers: int = 1, names: tuple[str, ...] | None = None
) -> tuple[list[dict], dict]:
    """Every variant x seed on every task -> (records, {task: {variant: [history per seed]}}, architectures)."""
    names = names or VARIANT_NAMES
    jobs = [(task, seed) for task in tasks for seed in range(seeds)]
    if workers > 1:
        with single_thread_pool(workers) as pool:
            outputs = list(pool.map(_run_seed, *zip(*[(t, s, recipe, root, names) for t, s in jobs], strict=True)))
    else:
        outputs = [_run_seed(task, seed, recipe, root, names) for task, seed in jobs]
    records, histories = [], {}
    for output in outputs:
        for record, history in output:
            records.append(record)
            if history:  # a model with Conv+ layers
                histories.setdefault(record["task"], {}).setdefault(record["variant"], []).append(history)
    return records, histories
