"""The ablation's outputs: a markdown table (mean +- std over seeds), a bar chart with error bars, a
per-layer interpretation plot, and attention maps overlaid on input images."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ..analysis import capture_inputs
from ..train import load_run
from .variants import VARIANTS


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(task: str, results: dict[str, list[dict]]) -> str:
    """Markdown: variant, test top-1 mean +- std, seeds, params, MFLOPs, train time, attention share."""
    lines = [
        f"| {task}: variant | top-1 (%) mean ± std | seeds | params | MFLOPs | train s/run | "
        "attention share (first → last Conv+ layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = results[variant.name]
        mean, std = _mean_std([r["final_top1"] for r in runs])
        layers = runs[0]["layers"]
        share = " → ".join(f"{100 * layer['attention_share']:.0f}%" for layer in layers) if layers else "—"
        lines.append(
            f"| {variant.name} | {mean:.2f} ± {std:.2f} | {len(runs)} | {runs[0]['params']:,} | "
            f"{runs[0]['flops'] / 1e6:.1f} | {statistics.fmean(r['wall_seconds'] for r in runs):.0f} | {share} |"
        )
    return "\n".join(lines)


def bar_chart(all_results: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    """Top-1 per task and variant, error bars = std over seeds."""
    tasks = list(all_results)
    width = 0.8 / len(VARIANTS)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(tasks)), 4))
    for i, variant in enumerate(VARIANTS):
        stats = [_mean_std([r["final_top1"] for r in all_results[t][variant.name]]) for t in tasks]
        ax.bar(
            [t + i * width for t in range(len(tasks))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            capsize=3,
            label=variant.name,
        )
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set(ylabel="test top-1 (%)", ylim=(0, 100), title="Conv+ vs conv-only vs attention-only (mean ± std)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layers_plot(task: str, results: dict[str, list[dict]], path: Path) -> Path:
    """Per Conv+ layer of each Conv+ variant (seed 0): attention energy share and mean attention distance."""
    fig, (ax_share, ax_dist) = plt.subplots(1, 2, figsize=(11, 3.8))
    for variant in VARIANTS:
        layers = results[variant.name][0]["layers"]
        if not layers:
            continue
        x = range(len(layers))
        ax_share.plot(x, [100 * layer["attention_share"] for layer in layers], "o-", label=variant.name)
        ax_dist.plot(x, [layer["mean_attention_distance"] or 0.0 for layer in layers], "o-", label=variant.name)
    ax_share.set(
        xlabel="Conv+ layer (input → output)",
        ylabel="attention share of output energy (%)",
        ylim=(-2, 102),
        title=f"{task}: conv-like (0%) or attention-like (100%)",
    )
    ax_dist.set(
        xlabel="Conv+ layer (input → output)",
        ylabel="mean attention distance (grid cells)",
        title=f"{task}: how far each layer looks",
    )
    for ax in (ax_share, ax_dist):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def attention_maps(run: Path, path: Path, count: int = 4) -> Path:
    """Input images with the first Conv+ layer's attention (head-averaged) from the central query overlaid."""
    trained = load_run(run, "last", max_val=count)
    model, data = trained.model, trained.data
    images = torch.stack([data.val[i][0] for i in range(count)])
    name, x = next(iter(capture_inputs(model, images).items()))
    module = dict(model.named_modules())[name]
    probs = module.attention_probs(x).mean(1)  # (B, N, N)
    h, w = x.shape[2:]
    query = (h // 2) * w + w // 2
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.8))
    for i, ax in enumerate(axes):
        attention = probs[i, query].view(1, 1, h, w)
        overlay = torch.nn.functional.interpolate(attention, size=images.shape[2:], mode="nearest")[0, 0]
        ax.imshow(images[i, 0], cmap="gray")
        ax.imshow(overlay, cmap="inferno", alpha=0.55)
        ax.plot((w // 2 + 0.5) * images.shape[3] / w - 0.5, (h // 2 + 0.5) * images.shape[2] / h - 0.5, "c+", ms=10)
        ax.set_title(f"label {int(data.val[i][1])}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{name}: attention of the central query (+), heads averaged", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
