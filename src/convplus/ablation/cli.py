"""``convplus ablate``: Conv+ against conv-only and attention-only at matched parameters, several seeds.

``--task all`` runs the calibrated suite (digits, texture, xor, samediff, shapes) and the conversion study (on xor);
``--data cifar10:PATH | imagefolder:PATH`` runs the same variants on your data; ``--report DIR`` rewrites
the report from the files a run left in DIR (results.json, layers.json, architectures.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..train.data import FORMS
from .backbones import BACKBONES
from .report import write_report
from .runner import FULL, QUICK, TASKS, architecture, backbone_of, run_suite
from .study import run_study
from .variants import VARIANT_NAMES, variants

STUDY_TASK = "xor"  # conv cannot solve it, attention can: the converted model must leave the conv solution
STUDY_SEEDS = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate", help="Conv+ vs conv-only vs attention-only, several seeds", description=__doc__
    )
    parser.add_argument("--task", default="all", choices=(*TASKS, "all"), help=f"{', '.join(TASKS)} or all")
    parser.add_argument("--data", help="your data instead of --task: cifar10:PATH | cifar100:PATH | imagefolder:PATH")
    parser.add_argument("--seeds", type=_positive_int, help="seeds per variant (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 64 images per task (smoke test)")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANT_NAMES, help="a subset (conv-to-convplus needs conv); default: all"
    )
    parser.add_argument(
        "--backbone", choices=tuple(BACKBONES), help="for every task (default: digits hierarchical, others isotropic)"
    )
    parser.add_argument("--workers", type=_positive_int, default=2, help="processes (one thread each)")
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"), help="run folders")
    parser.add_argument("--results", type=Path, help="results.json, layers.json and plots (default: --output)")
    parser.add_argument("--markdown", type=Path, help="the report (default: <results>/report.md)")
    parser.add_argument("--report", type=Path, metavar="DIR", help="only rewrite the report from DIR's files")
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.report:
        if not (args.report / "results.json").is_file():
            raise ValueError(f"--report {args.report}: no results.json there (run convplus ablate first)")
        markdown = args.markdown or args.report / "report.md"
        command = (
            json.loads((args.report / "command.json").read_text()) if (args.report / "command.json").is_file() else {}
        )
        print(write_report(args.report, markdown, command.get("command", "convplus ablate"), command.get("minutes")))
        return 0
    if args.data and args.data.partition(":")[0] not in ("cifar10", "cifar100", "imagefolder"):
        raise ValueError(f"--data {args.data!r}: expected cifar10:PATH | cifar100:PATH | imagefolder:PATH ({FORMS})")
    start = time.perf_counter()
    recipe = QUICK if args.quick else FULL
    recipe = type(recipe)(**{**recipe.__dict__, "backbone": args.backbone})
    tasks = [args.data] if args.data else list(TASKS) if args.task == "all" else [args.task]
    seeds = args.seeds or (2 if args.quick else 5)
    names = tuple(args.variants or VARIANT_NAMES)
    if "conv-to-convplus" in names and "conv" not in names:
        raise ValueError("--variants: conv-to-convplus fine-tunes the conv runs; add conv")
    results = args.results or args.output
    results.mkdir(parents=True, exist_ok=True)
    records, histories = run_suite(tasks, seeds, recipe, args.output, args.workers, names)
    architectures = {
        task: {
            v.name: architecture(task, v, recipe)
            for v in variants(backbone_of(task, recipe), recipe.heads)
            if v.name in names
        }
        for task in tasks
    }
    if args.task == "all" and not args.data and "conv" in names:
        records += run_study(STUDY_TASK, min(seeds, STUDY_SEEDS), recipe, args.output, args.workers)
    files = {"results.json": records, "layers.json": histories, "architectures.json": architectures}
    minutes = (time.perf_counter() - start) / 60
    flags = f"--data {args.data}" if args.data else f"--task {args.task}"
    command = f"convplus ablate {flags} --seeds {seeds}" + f" --backbone {args.backbone}" * bool(args.backbone)
    command += " --quick" * args.quick
    if args.variants:
        command += " --variants " + " ".join(names)
    files["command.json"] = {"command": command, "minutes": minutes}
    for name, content in files.items():
        (results / name).write_text(json.dumps(content, indent=1) + "\n")
    markdown = write_report(results, args.markdown or results / "report.md", command, minutes)
    print(f"{len(records)} runs in {minutes:.1f} min; report: {markdown}; records: {results / 'results.json'}")
    return 0
