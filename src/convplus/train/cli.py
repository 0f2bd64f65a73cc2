"""``convplus train`` and ``convplus eval`` (the root ``train.py`` runs ``convplus train``)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import plots
from .config import add_arguments, config_from_args
from .engine import TrainingDiverged, train
from .run import load_run


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


@torch.no_grad()
def run_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a number > 0")
    run = load_run(args.checkpoint, ema=args.ema, data=args.data)
    num_classes = run.data.num_classes
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5 = count = 0
    for images, labels in DataLoader(run.data.val, args.batch_size):
        logits = run.model(images)
        np.add.at(matrix, (labels.numpy(), logits.argmax(1).numpy()), 1)
        top5 += (logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]).any(1).sum().item()
        count += len(labels)
    top1 = 100 * np.trace(matrix) / count
    out = run.folder / "eval"
    out.mkdir(exist_ok=True)
    png = plots.confusion_matrix(matrix, out / "confusion_matrix.png", getattr(run.data.val, "classes", None))
    result = {
        "checkpoint": str(run.weights),
        "data": args.data or run.config.data,
        "images": count,
        "top1": top1,
        "top5": 100 * top5 / count,
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 {top1:.2f}%  top-5 {result['top5']:.2f}%  on {count} images; confusion matrix: {png}")
    return 0
