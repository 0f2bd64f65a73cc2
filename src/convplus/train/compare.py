"""``make run``: Conv+ ConvNeXt V2 atto against plain ConvNeXt V2 atto, same recipe, on the embedded digits.

Prints a side-by-side table (params, FLOPs, test top-1, train time) and where the run folders and plots are.

    python -m convplus.train.compare [--epochs 15] [--output runs/make-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .config import TrainConfig
from .engine import train

MODELS = {"Conv+ ConvNeXt V2 atto": "convplus_convnextv2_atto", "ConvNeXt V2 atto": "convnextv2_atto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--output", type=Path, default=Path("runs/make-run"))
    args = parser.parse_args()
    recipe = TrainConfig(
        data="digits", img_size=32, epochs=args.epochs, batch_size=64, lr=2e-3, warmup_epochs=1, seed=0, overwrite=True
    )
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


if __name__ == "__main__":
    main()
