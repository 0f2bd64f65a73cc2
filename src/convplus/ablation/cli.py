"""``convplus ablate --task TASK --seeds N [--quick]``: Conv+ against conv-only and attention-only."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import report
from .runner import FULL, QUICK, TASKS, run_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate", help="Conv+ vs conv-only vs attention-only, several seeds", description=__doc__
    )
    parser.add_argument("--task", default="all", choices=(*TASKS, "all"), help=f"{', '.join(TASKS)} or all")
    parser.add_argument("--seeds", type=_positive_int, default=3, help="seeds per variant (>= 1)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on a few hundred images (smoke test)")
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"))
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    recipe = QUICK if args.quick else FULL
    tasks = TASKS if args.task == "all" else (args.task,)
    all_results, sections = {}, []
    for task in tasks:
        results = all_results[task] = run_task(task, args.seeds, recipe, args.output)
        layers = report.layers_plot(task, results, args.output / f"{task}_layers.png")
        maps = report.attention_maps(
            args.output / task / "convplus-local" / "seed0", args.output / f"{task}_attention.png"
        )
        sections.append(f"{report.table(task, results)}\n\nPlots: {layers}, {maps}\n")
    chart = report.bar_chart(all_results, args.output / "top1.png")
    minutes = (time.perf_counter() - start) / 60
    command = f"convplus ablate --task {args.task} --seeds {args.seeds}{' --quick' if args.quick else ''}"
    text = (
        f"# Ablation results\n\nCommand: `{command}` ({minutes:.1f} min). Recipe: {recipe}.\n\n"
        + "\n".join(sections)
        + f"\nBar chart: {chart}\n"
    )
    (args.output / "results.md").write_text(text)
    (args.output / "results.json").write_text(json.dumps(all_results, indent=2, default=str) + "\n")
    print(text)
    return 0
