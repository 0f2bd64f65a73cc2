"""``convplus train`` and ``convplus eval`` (the root ``train.py`` runs ``convplus train``)."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.data import DataLoader

from . import distributed
from .config import add_arguments, config_from_args
from .engine import TrainingDiverged, train
from .run import load_run
from .tasks import task_class


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a (Conv+) model", description=_train_description())
    add_arguments(parser)
    parser.set_defaults(func=run_train)
    evaluator = subparsers.add_parser(
        "eval", help="evaluate a run's checkpoint (top-1/top-5 and confusion matrix, box/mask AP, mIoU)"
    )
    evaluator.add_argument("--checkpoint", required=True, help="a run folder (written by train) or its best/ last/")
    evaluator.add_argument("--data", default=None, help="dataset form (default: the run's own)")
    evaluator.add_argument("--batch-size", type=int, default=128)
    evaluator.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    evaluator.add_argument("--max-val-samples", type=int, default=None, help="only the first N validation images")
    evaluator.set_defaults(func=run_eval)


def _train_description() -> str:
    return (
        "Train any timm model on digits, an image folder, CIFAR pickles or a generated dataset; "
        "--replace-convplus turns ConvNeXt depthwise convs into Conv+. --task detection (coco:PATH, "
        "synthetic:shapes) and --task segmentation (ade20k:PATH, synthetic:shapes) put --model under an FPN "
        "with Faster / Mask R-CNN or a semantic FPN head. --task lm trains a byte-level language model "
        "(convplus_lm_*, transformer_lm_*, conv_lm_*) on text:PATH or text:stdlib (bits per byte), --task video "
        "a video network (convplus_video_*, conv_video_*) on synthetic:moving-digits. Writes config.json, metrics.csv, "
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
        key = task_class(cfg.task).best_key
        print(
            f"best {key} {summary[f'best_{key}']:.4g} (epoch {summary['best_epoch']}), final {key} "
            f"{summary[f'final_{key}']:.4g}; {summary['params'] / 1e6:.2f}M params, "
            f"{summary['flops'] / 1e6:.1f} MFLOPs; run folder {summary['output']}"
        )
    return 0


@torch.no_grad()
def run_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a number > 0")
    run = load_run(args.checkpoint, ema=args.ema, data=args.data, max_val=args.max_val_samples)
    data, task = run.data, run.task
    loader = DataLoader(data.val, args.batch_size, collate_fn=task.collate)
    metrics = task.evaluate(run.model, loader, distributed.Context(0, 1, torch.device("cpu")))
    out = run.folder / "eval"
    out.mkdir(exist_ok=True)
    pictures = task.report(run.model, out)
    result = {"checkpoint": str(run.weights), "data": run.config.data, "images": len(data.val), **metrics}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"{shown}  on {len(data.val)} images; {', '.join(map(str, pictures.values()))}")
    return 0
