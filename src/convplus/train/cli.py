"""``convplus train`` and ``convplus eval`` (the root ``train.py`` runs ``convplus train``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from . import plots
from .config import TrainConfig, add_arguments, config_from_args
from .data import build_data
from .engine import TrainingDiverged, build_model, train


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a (Conv+) model", description=_train_description())
    add_arguments(parser)
    parser.set_defaults(func=run_train)
    evaluator = subparsers.add_parser("eval", help="evaluate a run's checkpoint: top-1/top-5, confusion matrix")
    evaluator.add_argument("--checkpoint", required=True, help="a run folder (written by train) or its best/ last/")
    evaluator.add_argument("--data", default=None, help="dataset form (default: the run's own)")
    evaluator.add_argument("--batch-size", type=int, default=128)
    evaluator.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    evaluator.set_defaults(func=run_eval)


def _train_description() -> str:
    return (
        "Train any timm model on digits, an image folder, CIFAR pickles or a generated dataset; "
        "--replace-convplus turns ConvNeXt depthwise convs into Conv+. Writes config.json, metrics.csv, "
        "TensorBoard events, last/ and best/ checkpoints, summary.json and PNG plots to --output. "
        "Many processes: torchrun --nproc-per-node N train.py ..."
    )


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        summary = train(cfg)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not cfg.quiet and summary.get("plots") is not None:
        print(
            f"best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), final top-1 "
            f"{summary['final_top1']:.2f}%; {summary['params'] / 1e6:.2f}M params, "
            f"{summary['flops'] / 1e6:.1f} MFLOPs; run folder {summary['output']}"
        )
    return 0


def _checkpoint_folder(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or one of its checkpoint folders."""
    if (path / "model.safetensors").is_file():
        return path.parent, path
    if (path / "best" / "model.safetensors").is_file():
        return path, path / "best"
    raise ValueError(f"{path}: not a run folder or checkpoint (no model.safetensors or best/model.safetensors)")


@torch.no_grad()
def run_eval(args: argparse.Namespace) -> int:
    run, folder = _checkpoint_folder(Path(args.checkpoint))
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    data = build_data(args.data or cfg.data, cfg.img_size, cfg.seed)
    model = build_model(TrainConfig(**{**cfg.to_dict(), "pretrained_file": None}), data)
    weights = folder / ("ema.safetensors" if args.ema else "model.safetensors")
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as error:
        raise ValueError(f"{weights}: does not fit {cfg.model} ({str(error).splitlines()[0]})") from error
    model.eval()
    matrix = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    top5 = count = 0
    for images, labels in DataLoader(data.val, args.batch_size):
        logits = model(images)
        np.add.at(matrix, (labels.numpy(), logits.argmax(1).numpy()), 1)
        top5 += (logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]).any(1).sum().item()
        count += len(labels)
    top1 = 100 * np.trace(matrix) / count
    out = run / "eval"
    out.mkdir(exist_ok=True)
    png = plots.confusion_matrix(matrix, out / "confusion_matrix.png", getattr(data.val, "classes", None))
    result = {
        "checkpoint": str(weights),
        "data": args.data or cfg.data,
        "images": count,
        "top1": top1,
        "top5": 100 * top5 / count,
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 {top1:.2f}%  top-5 {result['top5']:.2f}%  on {count} images; confusion matrix: {png}")
    return 0
