"""Conv+ vs ConvNeXt V2 backbones for detection and segmentation on synthetic:shapes (docs/dense.md).

Accuracy: COCO box AP and mask AP of Mask R-CNN, mIoU of the semantic FPN, after ``--epochs`` epochs, for
``--seeds`` seeds (each seed draws the data and the initialisation; both backbones see the same ones):
mean ± std of the final epoch. Cost: detector inference time and peak memory at 512x512 and 1024x1024
(batch 1, 100 detections), training-step time at 512x512 (batch 2), as Conv+ / ConvNeXt V2 ratios of
paired timings.

    python benchmarks/dense.py [--seeds 3] [--epochs 24] [--output docs/dense.md]   # make dense-study
    python benchmarks/dense.py --quick --output /tmp/dense.md                        # checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from measure import paired_ratio, peak_bytes, timed

from convplus.models import create_detector
from convplus.train import TrainConfig, train

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
    "detection": {"fpn_channels": 64, "representation_size": 256, "box_batch_size_per_image": 128},
    "segmentation": {"fpn_channels": 64, "head_channels": 64},
}
"""The study's heads, narrower than torchvision's defaults (FPN 256, box head 1024, 512 sampled RoIs per
image: about 15x the training FLOPs of these at 128 px) so that 3 seeds of both backbones fit the budget."""


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
            epochs=args.epochs if task == "detection" else args.seg_epochs,
            batch_size=8,
            lr=args.lr,
            warmup_epochs=min(2, args.epochs - 1),
            seed=seed,
            output=str(args.runs / f"{task}-{backbone}-seed{seed}"),
            overwrite=True,
            quiet=True,
            max_train_samples=8 if args.quick else None,
            max_val_samples=8 if args.quick else None,
        )
        summary = train(cfg)
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


def cost(sizes: tuple[int, int], repeats: int, quick: bool) -> list[str]:
    """Table rows: seconds and peak memory of both backbones and their ratios."""
    torch.manual_seed(0)
    kwargs = {**(QUICK_KWARGS if quick else {}), "box_score_thresh": 0.0}
    detectors = {name: create_detector(backbone, 5, masks=True, **kwargs) for name, backbone in BACKBONES.items()}
    rows = []
    for size in sizes:
        for detector in detectors.values():
            detector.transform.min_size, detector.transform.max_size = (size,), size
        images = _images(size, 1)
        calls = {name: lambda d=detector, x=images: _infer(d, x) for name, detector in detectors.items()}
        plain, conv_plus = (calls[name] for name in ("ConvNeXt V2 atto", "Conv+ atto"))
        ratio = paired_ratio(plain, conv_plus, backward=False, repeats=repeats)
        seconds = {name: timed(fn, False, 0) for name, fn in calls.items()}
        peaks = {name: peak_bytes(fn, False) / 2**20 for name, fn in calls.items()}
        rows.append(_row(f"inference {size}x{size}, batch 1", seconds, ratio, peaks))
    size = sizes[0]
    images, targets = _images(size, 2), _targets(size, 2)
    for detector in detectors.values():
        detector.transform.min_size, detector.transform.max_size = (size,), size
    steps = {name: lambda d=detector: sum(d.train()(images, targets).values()) for name, detector in detectors.items()}
    ratio = paired_ratio(steps["ConvNeXt V2 atto"], steps["Conv+ atto"], backward=True, repeats=repeats)
    seconds = {name: timed(fn, True, 0) for name, fn in steps.items()}
    rows.append(_row(f"train step {size}x{size}, batch 2", seconds, ratio, None))
    return rows


def _row(what: str, seconds: dict, ratio: tuple, peaks: dict | None) -> str:
    memory = (
        f"{peaks['Conv+ atto']:.0f} / {peaks['ConvNeXt V2 atto']:.0f} MiB = "
        f"{peaks['Conv+ atto'] / peaks['ConvNeXt V2 atto']:.2f}x"
        if peaks
        else "-"
    )
    row = (
        f"| {what} | {seconds['Conv+ atto']:.3f} s | {seconds['ConvNeXt V2 atto']:.3f} s | "
        f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f}) | {memory} |"
    )
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5, help="paired timings per measurement")
    parser.add_argument("--runs", type=Path, default=Path("runs/dense-study"))
    parser.add_argument("--output", type=Path, default=Path("docs/dense.md"))
    parser.add_argument("--quick", action="store_true", help="tiny backbones, 1 epoch, 8 images, 128/256 px")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.repeats = 1, 1, 1
    scores = {name: [accuracy(b, seed, args) for seed in range(args.seeds)] for name, b in BACKBONES.items()}
    (args.runs / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    accuracy_rows = []
    for name, runs in scores.items():
        cells = []
        for metric in METRICS:
            values = [run[metric] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        accuracy_rows.append(f"| {name} | " + " | ".join(cells) + " |")
    cost_rows = cost((128, 256) if args.quick else (512, 1024), args.repeats, args.quick)
    device = f"CPU, {torch.get_num_threads()} threads"
    text = f"""# Detection and segmentation: Conv+ vs ConvNeXt V2 backbones

Generated by `python benchmarks/dense.py --seeds {args.seeds} --epochs {args.epochs}` (`make dense-study`)
{"(--quick: tiny backbones, a pipeline check, not a result)" if args.quick else ""} on {device}, torch
{torch.__version__}.

Data: [synthetic:shapes](datasets/shapes.md) (400 training, 100 validation scenes of 128x128, 5 shape
classes), read through the COCO and ADE20K loaders. Models: `convplus.models.create_detector(..., masks=True)`
(torchvision Mask R-CNN, FPN with a max-pool level) and `convplus.models.create_segmenter` (Panoptic-FPN
semantic head) on `convplus_convnextv2_atto` (Conv+ mixers, 7x7 windows in stages 0-2, global in stage 3)
and `convnextv2_atto`, both from scratch with the same recipe: AdamW, lr {args.lr}, cosine schedule,
batch 8, {args.epochs} epochs, img-size 128 (shorter side for detection, crop side for segmentation).
Values are fractions, mean ± std over {args.seeds} seed(s) of the final epoch.

| backbone | box AP | mask AP | mIoU |
|---|---|---|---|
{chr(10).join(accuracy_rows)}

Cost of the Mask R-CNN detector (untrained, score threshold 0 so that both keep 100 detections). Ratio:
median (lowest-highest) of {args.repeats} paired timings, Conv+ / ConvNeXt V2; memory: peak of PyTorch's
CPU allocator during one call (profiler events).

| measurement | Conv+ atto | ConvNeXt V2 atto | time ratio | peak memory (Conv+ / plain) |
|---|---|---|---|---|
{chr(10).join(cost_rows)}
"""
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
