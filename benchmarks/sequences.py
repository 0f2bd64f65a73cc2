"""Conv+ for sequences and video against attention and convolution, on the CPU (docs/sequences.md).

1. Language modelling, bits per byte: ``{convplus,transformer,conv}_lm_tiny`` (matched parameters) trained
   with ``convplus train --task lm --data text:stdlib`` for the same CPU time each (``--budget`` seconds of
   training steps: the training set is sized from a timed calibration of the model's steps), ``--seeds``
   seeds, against a unigram model of the training bytes.
2. Inference cost against sequence length (batch 1): tokens/s and peak memory of the Conv+ LM with windowed
   layers only, the transformer (causal ``scaled_dot_product_attention``, global) and the conv LM.
3. Video, ``synthetic:moving-digits``: top-1 of ``convplus_video_tiny`` and ``conv_video_tiny`` trained for the
   same CPU time, and inference time per clip, against the number of frames.

Every part's cost is bounded by its settings (training budgets; a model whose forward takes more than
``--max-call`` seconds is not run at longer sequences), so the whole study's time follows from them.

    python benchmarks/sequences.py [--seeds 3] [--budget 120] [--output docs/sequences.md]  # make sequences-study
    python benchmarks/sequences.py --quick --output /tmp/sequences.md                     # checks the pipeline
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from measure import fitted_exponent, peak_bytes, timed
from torch.utils.data import DataLoader

from convplus.data.text import text_splits
from convplus.info import cpu_model
from convplus.models.language import layer_plan
from convplus.train import TrainConfig, train
from convplus.train.engine import build_data, build_model
from convplus.train.tasks import task_class

LM_MODELS = {"Conv+": "convplus_lm_tiny", "transformer": "transformer_lm_tiny", "conv": "conv_lm_tiny"}
VIDEO_MODELS = {"Conv+": "convplus_video_tiny", "conv": "conv_video_tiny"}
QUICK_LM = {"dim": 32, "depth": 2, "heads": 2}
QUICK_VIDEO = {"dims": [8, 16], "depths": [1, 1], "heads": 2}


def seconds_per_sample(cfg: TrainConfig, steps: int = 3) -> tuple[float, int]:
    """Seconds of one training sample (forward, backward, AdamW step) of ``cfg``'s task and model, timed over
    ``steps`` batches after a warm-up batch, and the number of training samples."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    task = task_class(cfg.task)(cfg, data, torch.device("cpu"))
    model = build_model(cfg, data).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = iter(DataLoader(data.train, cfg.batch_size, shuffle=True, collate_fn=task.collate))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss, _ = task.step(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps * cfg.batch_size), len(data.train)


def budget_run(cfg: TrainConfig, budget: float) -> dict:
    """``train(cfg)`` on as many training samples per epoch as ``budget`` seconds of training steps allow over
    ``cfg.epochs`` epochs (at most the training set); the summary, plus ``train_seconds`` (measured) and
    ``samples`` (seen)."""
    seconds, available = seconds_per_sample(cfg)
    per_epoch = min(available, max(cfg.batch_size, int(budget / cfg.epochs / seconds)))
    summary = train(dataclasses.replace(cfg, max_train_samples=per_epoch))
    with open(Path(summary["output"]) / "metrics.csv") as f:
        header, *rows = [line.strip().split(",") for line in f]
    column = header.index("epoch_seconds")
    return {**summary, "train_seconds": sum(float(row[column]) for row in rows), "samples": per_epoch * cfg.epochs}


def unigram_bits_per_byte(train_bytes: bytes, val_bytes: bytes) -> float:
    """Bits per byte of ``val_bytes`` under the byte frequencies of ``train_bytes`` (add-one smoothed)."""
    counts = collections.Counter(train_bytes)
    total = len(train_bytes) + 256
    return -sum(math.log2((counts[b] + 1) / total) for b in val_bytes) / len(val_bytes)


def language_models(args: argparse.Namespace) -> dict:
    """Every LM x seed trained for the budget: {"runs": {label: [run, ...]}, "unigram": bits per byte}."""
    runs: dict[str, list[dict]] = {}
    for name, model in LM_MODELS.items():
        runs[name] = []
        for seed in range(args.seeds):
            cfg = TrainConfig(
                task="lm",
                model=model,
                model_kwargs=QUICK_LM if args.quick else {},
                data="text:stdlib",
                seq_len=args.seq_len,
                epochs=args.lm_epochs,
                batch_size=16,
                lr=args.lm_lr,
                weight_decay=0.1,
                warmup_epochs=0,
                max_val_samples=args.val_sequences,
                seed=seed,
                output=str(args.runs / f"lm-{model}-seed{seed}"),
                overwrite=True,
                quiet=True,
            )
            runs[name].append(budget_run(cfg, args.budget))
    train_bytes, val_bytes = text_splits("text:stdlib")
    unigram = unigram_bits_per_byte(train_bytes, val_bytes[1 : args.val_sequences * args.seq_len + 1])
    return {"runs": runs, "unigram": unigram}


def language_rows(lm: dict, seq_len: int) -> list[str]:
    """Table rows: model, params, validation bits per byte (mean ± std over seeds), training s, bytes seen."""
    rows = []
    for name, results in lm["runs"].items():

        def stat(key: str, results=results) -> str:
            values = [r[key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        rows.append(
            f"| {name} (`{LM_MODELS[name]}`) | {results[0]['params'] / 1e6:.3f}M | {stat('final_bpb')} | "
            f"{statistics.mean(r['train_seconds'] for r in results):.0f} | "
            f"{statistics.mean(r['samples'] for r in results) * seq_len:,.0f} |"
        )
    return rows


def sweep_models(quick: bool) -> dict[str, torch.nn.Module]:
    """The LMs of the cost sweep: Conv+ with windowed layers only (no global layer), the transformer, conv."""
    kwargs = QUICK_LM if quick else {}
    depth = kwargs.get("depth", 4)
    plans = {"Conv+ (windowed)": {"plan": layer_plan(depth, global_layers=0)}, "transformer": {}, "conv": {}}
    names = {"Conv+ (windowed)": "convplus_lm_tiny", "transformer": "transformer_lm_tiny", "conv": "conv_lm_tiny"}
    return {label: timm.create_model(names[label], **kwargs, **plans[label]).eval() for label in plans}


@torch.no_grad()
def sequence_cost(args: argparse.Namespace) -> dict:
    """{model: {length: [tokens/s, peak MiB]}} for every length the model was run at."""
    torch.manual_seed(0)
    results: dict[str, dict[str, list[float]]] = {}
    for label, model in sweep_models(args.quick).items():
        results[label] = {}
        for length in args.lengths:
            tokens = torch.randint(0, 256, (1, length))
            seconds = timed(lambda model=model, tokens=tokens: model(tokens), backward=False, repeats=args.repeats)
            peak = peak_bytes(lambda model=model, tokens=tokens: model(tokens), backward=False)
            results[label][str(length)] = [length / seconds, peak / 2**20]
            if seconds > args.max_call:
                break
    return results


def cost_rows(cost: dict) -> tuple[list[str], list[str]]:
    """Table rows (length: tokens/s / peak MiB per model) and each model's fitted exponents."""
    lengths = sorted({int(n) for points in cost.values() for n in points})
    rows = []
    for length in lengths:
        cells = [
            f"{points[str(length)][0]:,.0f} / {points[str(length)][1]:,.1f}" if str(length) in points else "not run"
            for points in cost.values()
        ]
        rows.append(f"| {length} | " + " | ".join(cells) + " |")
    return rows, [f"{m}: {p}" for m, p in exponents(cost).items()]


def exponents(cost: dict) -> dict[str, str]:
    """Per model: 'time ~ L^a, memory ~ L^b', fitted on log-log over the lengths it ran."""
    fitted = {}
    for m, points in cost.items():
        if len(points) > 1:
            time_p = fitted_exponent([(int(n), int(n) / tps) for n, (tps, _) in points.items()])
            memory_p = fitted_exponent([(int(n), mib) for n, (_, mib) in points.items()])
            fitted[m] = f"time ~ L^{time_p:.2f}, memory ~ L^{memory_p:.2f}"
    return fitted


def video(args: argparse.Namespace) -> dict:
    """{f"{model}-{frames}": training summary + ms_per_clip} for every model and clip length."""
    results = {}
    for frames in args.frames:
        for model in VIDEO_MODELS.values():
            cfg = TrainConfig(
                task="video",
                model=model,
                model_kwargs=QUICK_VIDEO if args.quick else {},
                data="synthetic:moving-digits",
                frames=frames,
                img_size=32,
                epochs=args.video_epochs,
                batch_size=16,
                lr=2e-3,
                warmup_epochs=0,
                max_val_samples=args.val_clips,
                output=str(args.runs / f"video-{model}-{frames}f"),
                overwrite=True,
                quiet=True,
            )
            summary = budget_run(cfg, args.video_budget)
            net = timm.create_model(model, num_classes=8, in_chans=1, **cfg.model_kwargs).eval()
            clip = torch.randn(1, 1, frames, 32, 32)
            with torch.no_grad():
                ms = 1000 * timed(lambda net=net, clip=clip: net(clip), backward=False, repeats=args.repeats)
            results[f"{model}-{frames}"] = {**summary, "ms_per_clip": ms, "frames": frames}
    return results


def video_rows(clips: dict) -> list[str]:
    """Rows: frames, then per model top-1 (%), clips seen, inference ms per clip."""
    rows = []
    for frames in sorted({r["frames"] for r in clips.values()}):
        cells = [
            f"{r['final_top1']:.1f} | {r['samples']} | {r['ms_per_clip']:.1f}"
            for model in VIDEO_MODELS.values()
            if (r := clips.get(f"{model}-{frames}"))
        ]
        rows.append(f"| {frames} | " + " | ".join(cells) + " |")
    return rows


def findings(lm: dict, cost: dict, clips: dict) -> list[str]:
    """What the numbers say, computed from them."""
    means = {name: statistics.mean(r["final_bpb"] for r in runs) for name, runs in lm["runs"].items()}
    best = min(means, key=means.get)
    beaten = "every model ends below" if all(m < lm["unigram"] for m in means.values()) else "not every model beats"
    lines = [
        f"- Language modelling: {beaten} the unigram's {lm['unigram']:.3f} bits per byte ("
        + ", ".join(f"{name} {value:.3f}" for name, value in means.items())
        + f"); lowest: {best}."
    ]
    for name, fitted in exponents(cost).items():
        lines.append(f"- Inference cost, {name}: {fitted}.")
    for frames in sorted({r["frames"] for r in clips.values()}):
        scores = {m: clips[f"{m}-{frames}"]["final_top1"] for m in VIDEO_MODELS.values() if f"{m}-{frames}" in clips}
        lines.append(f"- Video, {frames} frames: " + ", ".join(f"`{m}` {v:.1f}%" for m, v in scores.items()) + ".")
    return lines


PARTS = {"lm": language_models, "cost": sequence_cost, "video": video}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of LM training steps per run")
    parser.add_argument("--lm-lr", type=float, default=2e-3, help="peak learning rate of the LMs")
    parser.add_argument("--video-budget", type=float, default=120.0, help="seconds of video training steps per run")
    parser.add_argument("--lm-epochs", type=int, default=1, help="epochs an LM budget is spread over")
    parser.add_argument("--video-epochs", type=int, default=4, help="epochs a video budget is spread over")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-sequences", type=int, default=64, help="validation sequences of the LMs")
    parser.add_argument("--val-clips", type=int, default=400)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after a warm-up, median")
    parser.add_argument("--max-call", type=float, default=30.0, help="longer sequences skipped past this (s)")
    parser.add_argument(
        "--parts",
        nargs="*",
        choices=tuple(PARTS),
        default=tuple(PARTS),
        help="parts to run (none: only rewrite the doc); the others are read from the JSON files in --runs",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/sequences-study"))
    parser.add_argument("--output", type=Path, default=Path("docs/sequences.md"))
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 seed, 3 s budgets: a pipeline check")
    args = parser.parse_args()
    command = "python benchmarks/sequences.py " + " ".join(sys.argv[1:])
    if args.quick:
        args.seeds, args.budget, args.video_budget, args.video_epochs, args.repeats = 1, 3.0, 3.0, 2, 1
        args.val_sequences, args.val_clips, args.lengths, args.frames = 8, 32, [256, 1024], [4]
    args.runs.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, run in PARTS.items():
        path = args.runs / f"{name}.json"
        if name in args.parts:
            start = time.perf_counter()
            result = run(args)
            parts[name] = {"command": command, "minutes": (time.perf_counter() - start) / 60, "result": result}
            path.write_text(json.dumps(parts[name], indent=2, default=str) + "\n")
        elif path.is_file():
            parts[name] = json.loads(path.read_text())
        else:
            raise SystemExit(f"--parts: {name} is not run and {path} does not exist; run it first")
    args.output.write_text(report(args, parts))
    print(f"wrote {args.output}")


def report(args: argparse.Namespace, parts: dict) -> str:
    """docs/sequences.md from the three parts' records (each with the command and minutes that made it)."""
    lm, cost, clips = (parts[name]["result"] for name in PARTS)
    commands = dict.fromkeys(part["command"] for part in parts.values())
    made = "; ".join(
        f"`{command}` ("
        + ", ".join(f"{n} {p['minutes']:.1f} min" for n, p in parts.items() if p["command"] == command)
        + ")"
        for command in commands
    )
    cost_table, fitted = cost_rows(cost)
    quick = "\n**--quick: tiny models and budgets of seconds, a check of the pipeline, not a result.**\n"
    return f"""# Sequences and video: Conv+ against attention and convolution

Every number below was made on {cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}, by
`make sequences-study`; the command(s) and each part's time: {made}.
{quick if args.quick else ""}
## What the numbers say

{chr(10).join(findings(lm, cost, clips))}

## Language modelling: bits per byte at equal CPU time

Data: `--data text:stdlib`, the `*.py` files of this Python's standard library, split by file (about one
file in ten is validation), bytes as tokens; {args.seq_len}-byte sequences, batch 16, AdamW (lr {args.lm_lr:g},
weight decay 0.1), cosine schedule over {args.lm_epochs} epoch(s). Each run trains for about {args.budget:.0f} s
of training steps: its training set is sized from a timed calibration of its own steps. Validation: bits per
byte on the first {args.val_sequences} validation sequences ({args.val_sequences * args.seq_len:,} bytes).
Mean ± std over {args.seeds} seed(s) (data order and initialisation).

Models (`convplus.models.language`, 4 pre-norm blocks of width 128, 4 heads, each block's MLP sized so
that the three have the same parameters): Conv+ = causal `ConvPlus1d` ('qk' scores, a 7-tap causal conv
term) with windows of 15 earlier positions at dilations 1, 2, 4 and a global top layer; transformer =
causal `scaled_dot_product_attention`; conv = linear, 15-tap causal depthwise conv (dilations 1, 2, 4, 1),
linear. A unigram model of the training bytes gives **{lm["unigram"]:.3f}** bits per byte on the same bytes.

| model | params | validation bits per byte | training s | bytes seen |
|---|---|---|---|---|
{chr(10).join(language_rows(lm, args.seq_len))}

## Inference cost against sequence length

Batch 1, untrained tiny LMs; Conv+ has windowed layers only (windows of 15 at dilations 1, 2, 4, 8).
Cells: tokens/s / peak MiB of PyTorch's CPU allocator during one forward (profiler events); time: median
of {args.repeats} call(s) after a warm-up. A model whose call took over {args.max_call:.0f} s is not run at
longer sequences.

| sequence length | {" | ".join(cost)} |
|---|---|---|---|
{chr(10).join(cost_table)}

Fitted exponents (least squares on log-log): {"; ".join(fitted)}.

## Video: moving digits

Data: [synthetic:moving-digits](datasets/moving-digits.md) (8 classes: digit parity x direction of motion;
a single frame is at chance on the direction), 32x32 frames. Models (`convplus.models.video`, matched
parameters): ConvNeXt-style, 2 stages (32, 64 channels), (3, 5, 5) Conv+ windows with a global last stage,
against (3, 5, 5) depthwise 3-d convs. Each run trains for about {args.video_budget:.0f} s of training
steps (batch 16, {args.video_epochs} epochs), one seed; top-1 on {args.val_clips} validation clips; inference: ms
per clip at batch 1, median of {args.repeats} call(s).

| frames | Conv+ top-1 (%) | Conv+ clips seen | Conv+ ms/clip | conv top-1 (%) | conv clips seen | conv ms/clip |
|---|---|---|---|---|---|---|
{chr(10).join(video_rows(clips))}
"""


if __name__ == "__main__":
    main()
