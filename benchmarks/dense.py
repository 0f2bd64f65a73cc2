"""Conv+ vs ConvNeXt V2 backbones for detection and segmentation on synthetic:shapes (docs/dense.md).

Accuracy: COCO box AP and mask AP of Mask R-CNN after ``--detection-epochs`` epochs, mIoU of the semantic FPN
after ``--segmentation-epochs``, for ``--seeds`` seeds (each seed draws the data order and the initialisation;
both backbones see the same ones): mean ± std of the final epoch. Finished runs of the same settings in
``--runs`` are reused, so an interrupted study goes on where it stopped. Cost: detector inference time and peak
memory at 512x512 and 1024x1024 (batch 1, 100 detections), training-step time at 512x512 (batch 2), as
Conv+ / ConvNeXt V2 ratios of paired timings.

    python benchmarks/dense.py [--seeds 3] [--output docs/dense.md]   # make dense-study
    python benchmarks/dense.py --quick --output /tmp/dense.md          # checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from measure import paired_ratio, peak_bytes, timed

from convplus import info
from convplus.models import create_detector
from convplus.train import TrainConfig, finished_summary, train

BACKBONES = {"Conv+ atto": "convplus_convnextv2_atto", "ConvNeXt V2 atto": "convnextv2_atto"}
METRICS = {
    "box AP": ("detection", "box_ap"),
    "box AP50": ("detection", "box_ap50"),
    "mask AP": ("detection", "mask_ap"),
    "mIoU": ("segmentation", "miou"),
    "pixel acc": ("segmentation", "pixel_acc"),
}
QUICK_KWARGS = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "fpn_channels": 16}
HEADS = {
    "detection": {
        "fpn_channels": 64,
        "representation_size": 256,
        "box_batch_size_per_image": 64,
        "rpn_post_nms_top_n_train": 500,
        "anchor_sizes": [8, 16, 32, 64, 128],
    },
    "segmentation": {"fpn_channels": 64, "head_channels": 64},
}
"""The study's heads, narrower than torchvision's defaults (FPN 256, box head 1024, 512 sampled RoIs and 2000
proposals per image: over 15x the training FLOPs of these at 128 px) so that 3 seeds of both backbones fit the
budget, and anchors for objects of 10-56 px (torchvision's start at 32 px)."""


def accuracy(backbone: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Final-epoch box AP, AP50, mask AP and mIoU of one seed, and each run's wall seconds."""
    scores = {}
    for task in ("detection", "segmentation"):
        cfg = TrainConfig(
            task=task,
            masks=task == "detection",
            model=backbone,
            model_kwargs={**HEADS[task], **(QUICK_KWARGS if args.quick else {})},
            data="synthetic:shapes",
            img_size=128,
            epochs=args.epochs[task],
            batch_size=8,
            lr=args.lr,
            warmup_epochs=min(1, args.epochs[task] - 1),
            seed=seed,
            output=str(args.runs / f"{task}-{backbone}-seed{seed}"),
            overwrite=True,
            quiet=True,
            workers=args.workers,
            max_train_samples=8 if args.quick else None,
            max_val_samples=8 if args.quick else None,
        )
        summary = finished_summary(cfg) or train(cfg)
        scores.update({name: summary[key] for name, (t, key) in METRICS.items() if t == task})
        scores[f"{task} seconds"] = summary["wall_seconds"]
    return scores


def _images(size: int, count: int) -> list[torch.Tensor]:
    return [torch.rand(3, size, size) for _ in range(count)]


def _targets(size: int, count: int) -> list[dict]:
    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.6, size * 0.7]])
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[:, int(size * 0.2) : int(size * 0.7), int(size * 0.2) : int(size * 0.6)] = 1
    return [{"boxes": box, "labels": torch.tensor([1]), "masks": mask} for _ in range(count)]


@torch.no_grad()
def _infer(detector, images: list[torch.Tensor]) -> list[dict]:
    return detector.eval()(images)


QUICK_NOTE = " (--quick: tiny backbones, a pipeline check, not a result)"
TARGETS = {"train step": ("time", 1.3), "inference": ("memory", 1.5)}
"""Measurement kind -> (the ratio that has a target, its bound): Conv+ / ConvNeXt V2 at most this."""


def cost(sizes: tuple[int, int], repeats: int, quick: bool) -> list[dict]:
    """Seconds and peak memory of both backbones and their paired time ratio, for the detector as
    ``create_detector`` makes it (torchvision's head widths) and for its backbone + FPN alone."""
    torch.manual_seed(0)
    kwargs = {**(QUICK_KWARGS if quick else {}), "box_score_thresh": 0.0}
    detectors = {name: create_detector(backbone, 5, masks=True, **kwargs) for name, backbone in BACKBONES.items()}
    rows = []
    for size in sizes:
        for detector in detectors.values():
            detector.transform.min_size, detector.transform.max_size = (size,), size
        images = _images(size, 1)
        batch = torch.stack(images)
        for what, calls in (
            ("inference", {name: lambda d=d, x=images: _infer(d, x) for name, d in detectors.items()}),
            ("backbone + FPN", {name: lambda d=d, x=batch: _features(d.backbone, x) for name, d in detectors.items()}),
            (
                "backbone alone",
                {name: lambda d=d, x=batch: _features(d.backbone.body, x) for name, d in detectors.items()},
            ),
        ):
            rows.append(_measure(f"{what} {size}x{size}, batch 1", calls, False, repeats, memory=True))
    size = sizes[0]
    images, targets = _images(size, 2), _targets(size, 2)
    for detector in detectors.values():
        detector.transform.min_size, detector.transform.max_size = (size,), size
    steps = {name: lambda d=d: sum(d.train()(images, targets).values()) for name, d in detectors.items()}
    rows.append(_measure(f"train step {size}x{size}, batch 2", steps, True, repeats, memory=False))
    return rows


@torch.no_grad()
def _features(extractor: torch.nn.Module, batch: torch.Tensor) -> dict:
    return extractor.eval()(batch)


def _measure(what: str, calls: dict, backward: bool, repeats: int, memory: bool) -> dict:
    """One row: median seconds of each, the paired ratio (median, lowest, highest), peak MiB of each."""
    ratio = paired_ratio(calls["ConvNeXt V2 atto"], calls["Conv+ atto"], backward=backward, repeats=repeats)
    row = {
        "what": what,
        "seconds": {name: timed(fn, backward, repeats) for name, fn in calls.items()},
        "ratio": ratio,
        "peak_mib": {name: peak_bytes(fn, backward) / 2**20 for name, fn in calls.items()} if memory else None,
    }
    print(row, flush=True)
    return row


def _verdict(row: dict) -> str:
    """'met' / 'missed' with the measured ratio for a row that has a target, '-' for one that has none."""
    kind, bound = next((target for key, target in TARGETS.items() if row["what"].startswith(key)), (None, None))
    if kind is None:
        return "-"
    value = row["ratio"][0] if kind == "time" else row["peak_mib"]["Conv+ atto"] / row["peak_mib"]["ConvNeXt V2 atto"]
    return f"{kind} <= {bound}x: {'met' if value <= bound else 'missed'} ({value:.2f}x)"


def _cost_line(row: dict) -> str:
    seconds, ratio, peaks = row["seconds"], row["ratio"], row["peak_mib"]
    memory = (
        f"{peaks['Conv+ atto']:.0f} / {peaks['ConvNeXt V2 atto']:.0f} MiB = "
        f"{peaks['Conv+ atto'] / peaks['ConvNeXt V2 atto']:.2f}x"
        if peaks
        else "-"
    )
    return (
        f"| {row['what']} | {seconds['Conv+ atto']:.3f} s | {seconds['ConvNeXt V2 atto']:.3f} s | "
        f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f}) | {memory} | {_verdict(row)} |"
    )


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in kwargs.items())


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def accuracy_tables(scores: dict[str, list[dict]]) -> str:
    """Mean ± std per backbone, the paired Conv+ - ConvNeXt V2 difference per metric, and every seed."""
    header = "| backbone | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
    rows = [
        f"| {name} | " + " | ".join(_mean_std([r[m] for r in runs]) for m in METRICS) + " |"
        for name, runs in scores.items()
    ]
    plus, plain = scores["Conv+ atto"], scores["ConvNeXt V2 atto"]
    differences = [_mean_std([a[m] - b[m] for a, b in zip(plus, plain, strict=True)]) for m in METRICS]
    rows.append("| Conv+ - ConvNeXt V2 (paired by seed) | " + " | ".join(differences) + " |")
    seed_header = "| backbone | seed | " + " | ".join(METRICS) + " | detection s | segmentation s |\n|---|---|"
    seed_header += "---|" * (len(METRICS) + 2)
    seed_rows = [
        f"| {name} | {seed} | "
        + " | ".join(f"{r[m]:.3f}" for m in METRICS)
        + f" | {r['detection seconds']:.0f} | {r['segmentation seconds']:.0f} |"
        for name, runs in scores.items()
        for seed, r in enumerate(runs)
    ]
    return "\n".join([header, *rows, "", "Every seed:", "", seed_header, *seed_rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--detection-epochs", type=int, default=4)
    parser.add_argument("--segmentation-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--repeats", type=int, default=5, help="paired timings per measurement")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes per run")
    parser.add_argument("--runs", type=Path, default=Path("runs/dense-study"))
    parser.add_argument("--output", type=Path, default=Path("docs/dense.md"))
    parser.add_argument("--quick", action="store_true", help="tiny backbones, 1 epoch, 8 images, 128/256 px")
    args = parser.parse_args()
    command = " ".join(["python benchmarks/dense.py", *sys.argv[1:]])
    if args.quick:
        args.detection_epochs = args.segmentation_epochs = args.seeds = args.repeats = 1
    args.epochs = {"detection": args.detection_epochs, "segmentation": args.segmentation_epochs}
    scores = {name: [] for name in BACKBONES}
    for seed in range(args.seeds):  # seed by seed, both backbones: an interrupted study has paired runs
        for name, backbone in BACKBONES.items():
            scores[name].append(accuracy(backbone, seed, args))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    run_seconds = [run[f"{task} seconds"] for runs in scores.values() for run in runs for task in args.epochs]
    training_minutes = sum(run_seconds) / 60  # the runs' own wall times, reused runs included
    start = time.perf_counter()
    cost_rows = cost((128, 256) if args.quick else (512, 1024), args.repeats, args.quick)
    minutes = training_minutes + (time.perf_counter() - start) / 60
    text = f"""# Detection and segmentation: Conv+ vs ConvNeXt V2 backbones

Generated by `make dense-study`{QUICK_NOTE if args.quick else ""}:

    {command}

on {info.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__},
torchvision {torchvision.__version__}: {minutes:.0f} minutes in all ({training_minutes:.0f} of training and
evaluation; the wall time of every run is in the per-seed table).

## Accuracy

Data: [synthetic:shapes](datasets/shapes.md) (400 training and 100 validation scenes of 128x128, 5 shape
classes), read through the COCO and ADE20K loaders. Models: `create_detector(..., masks=True)` (torchvision
Mask R-CNN, FPN with a max-pool level) and `create_segmenter` (Panoptic-FPN semantic head) on
`convplus_convnextv2_atto` (Conv+ mixers: 7x7 windows in stages 0-2, global in stage 3) and `convnextv2_atto`,
both from scratch with the same recipe: AdamW, lr {args.lr}, 1 warm-up epoch then cosine, batch 8, img-size 128
(shorter side for detection, crop side for segmentation); detection {args.detection_epochs} epochs, segmentation
{args.segmentation_epochs} epochs. Heads narrower than torchvision's defaults, so that the study fits its budget
on a CPU: detection {_kwargs(HEADS["detection"])}; segmentation {_kwargs(HEADS["segmentation"])}.
Each seed draws the initialisation and the data order; both backbones see the
same seeds. Values are fractions of the final epoch: COCO box AP (IoU 0.5:0.95), box AP50, mask AP, mIoU (mean
over the classes present) and pixel accuracy; mean ± std over {args.seeds} seed(s).

{accuracy_tables(scores)}

## Cost at resolution

The Mask R-CNN detector as `create_detector(backbone, 5, masks=True)` makes it (torchvision's head widths),
untrained, with score threshold 0 so that both keep 100 detections; "backbone + FPN" is its feature extractor
alone, "backbone alone" the timm `features_only` model without the FPN. Time ratio: median (lowest-highest)
of {args.repeats} paired timings, Conv+ / ConvNeXt V2, after a warm-up pair; seconds: medians.
Memory: the peak bytes PyTorch's CPU allocator holds during one call above what it
held before (the weights), from the profiler's allocation events. Targets: train step <= 1.3x, inference
memory <= 1.5x.

| measurement | Conv+ atto | ConvNeXt V2 atto | time ratio | peak memory (Conv+ / plain) | target |
|---|---|---|---|---|---|
{chr(10).join(map(_cost_line, cost_rows))}
"""
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
