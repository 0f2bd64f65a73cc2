"""``make run``: Conv+ ConvNeXt V2 atto against plain ConvNeXt V2 atto, same recipe, on the embedded digits.

Builds (or loads) the C++ CPU kernel first, so that no timed run pays for its compilation; then prints a
side-by-side table (params, FLOPs, test top-1, train time), where the run folders are, and writes
``comparison.png`` (validation top-1 per epoch of both models, with the table's numbers).

    python -m convplus.train.compare [--epochs 15] [--output runs/make-run]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..info import backend_status
from .config import TrainConfig
from .engine import train

MODELS = {"Conv+ ConvNeXt V2 atto": "convplus_convnextv2_atto", "ConvNeXt V2 atto": "convnextv2_atto"}


def prepare_cpu_kernel() -> str:
    """Load (or, in a never-built source checkout, build) the C++ CPU kernel now, outside any timed run; one
    line saying how it went."""
    start = time.perf_counter()
    status = backend_status("cpu", torch.device("cpu"))
    return f"C++ CPU kernel {status}; {time.perf_counter() - start:.1f} s, not counted below"


def comparison_plot(results: dict[str, dict], path: Path) -> Path:
    """Validation top-1 per epoch of each run (its metrics.csv) and, in the legend, its test top-1, train time
    and parameters. ``results`` maps a label to the run's summary."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lowest = 100.0
    for label, summary in results.items():
        with open(Path(summary["output"]) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        top1 = [float(r["val_top1"]) for r in rows]
        lowest = min(lowest, *top1)
        ax.plot(
            epochs,
            top1,
            "o-",
            ms=3,
            label=f"{label}: top-1 {summary['final_top1']:.2f}%, {summary['wall_seconds']:.0f} s, "
            f"{summary['params'] / 1e6:.2f}M params",
        )
    ax.set(  # the axis spans the curves, so that a one-point difference stays visible
        xlabel="epoch",
        ylabel="validation top-1 (%)",
        ylim=(max(0.0, lowest - 2.0), 100.5),
        title="Conv+ vs plain ConvNeXt V2, same recipe",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--output", type=Path, default=Path("runs/make-run"))
    args = parser.parse_args()
    recipe = TrainConfig(
        data="digits", img_size=32, epochs=args.epochs, batch_size=64, lr=2e-3, warmup_epochs=1, seed=0, overwrite=True
    )
    print(prepare_cpu_kernel(), flush=True)
    results = {}
    for label, model in MODELS.items():
        print(f"== {label} ({model})", flush=True)
        cfg = dataclasses.replace(recipe, model=model, output=str(args.output / model))
        results[label] = train(cfg)
    print()
    print(f"Digits (1347 train / 450 test images, 32x32), {args.epochs} epochs, AdamW lr 2e-3, cosine, batch 64")
    print(f"{'model':24s} {'params':>8s} {'MFLOPs':>8s} {'test top-1':>10s} {'train time':>11s}")
    for label, s in results.items():
        print(
            f"{label:24s} {s['params'] / 1e6:7.2f}M {s['flops'] / 1e6:8.1f} {s['final_top1']:9.2f}% "
            f"{s['wall_seconds']:10.1f}s"
        )
    print()
    for label, s in results.items():
        print(f"{label}: {s['output']}/  plots: {', '.join(s['plots'].values())}")
    (args.output / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"comparison plot: {comparison_plot(results, args.output / 'comparison.png')}")


if __name__ == "__main__":
    main()
