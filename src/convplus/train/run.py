"""A run folder read back: ``load_run(folder)`` gives its config, data, model with trained weights, summary."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .config import TrainConfig
from .data import DataSplits
from .tasks import Task, task_class


@dataclass
class Run:
    """One trained run, ready to evaluate or inspect."""

    folder: Path  # the run folder: config.json, metrics.csv, summary.json, best/, last/
    weights: Path  # the safetensors file loaded into ``model``
    config: TrainConfig
    data: DataSplits
    task: Task  # the run's task (classification, detection, segmentation) on ``data``, on the CPU
    model: nn.Module  # in eval mode
    summary: dict | None  # summary.json; None for a run that has not finished


def load_run(
    path: str | Path,
    checkpoint: str = "best",
    ema: bool = False,
    data: str | None = None,
    max_val: int | None = None,
) -> Run:
    """The run in ``path``: a run folder (its ``checkpoint`` folder, ``best`` or ``last``, is loaded) or one of
    its checkpoint folders. ``ema`` loads the EMA weights; ``data`` is another dataset form than the run's;
    ``max_val`` keeps only the first N validation images. Bad paths raise ``ValueError``."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        folder, checkpoint_folder = path.parent, path
    elif (path / checkpoint / "model.safetensors").is_file():
        folder, checkpoint_folder = path, path / checkpoint
    else:
        raise ValueError(
            f"{path}: not a run folder or checkpoint (no model.safetensors or {checkpoint}/model.safetensors)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a run folder (no config.json beside {checkpoint_folder.name}/)")
    try:
        config = TrainConfig(**json.loads((folder / "config.json").read_text()))
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'config.json'}: not a run's settings ({error})") from error
    # the checkpoint holds the weights; evaluation may use other data or fewer validation images
    config = dataclasses.replace(config, pretrained_file=None, data=data or config.data, max_val_samples=max_val)
    weights = checkpoint_folder / ("ema.safetensors" if ema else "model.safetensors")
    if not weights.is_file():
        raise ValueError(f"{weights}: no EMA weights (the run was trained without --ema)")
    cls = task_class(config.task)
    splits = cls.build_data(config)
    task = cls(config, splits, torch.device("cpu"))
    model = task.build_model()
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as error:
        raise ValueError(f"{weights}: does not fit {config.model} ({str(error).splitlines()[0]})") from error
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return Run(folder, weights, config, splits, task, model.eval(), summary)


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The summary of a finished run of exactly these settings in ``cfg.output``, else None: a study that
    was interrupted, or that gained runs, trains only what is missing (``train(cfg)`` would redo it)."""
    folder = Path(cfg.output)
    if not (folder / "summary.json").is_file() or not (folder / "config.json").is_file():
        return None
    if json.loads((folder / "config.json").read_text()) != json.loads(json.dumps(cfg.to_dict())):
        return None
    return json.loads((folder / "summary.json").read_text())
