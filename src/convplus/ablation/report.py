"""The ablation's report, regenerated from its files alone: ``results.json`` (one record per task, variant
and seed, and one per setting and seed of the conversion study: those have a ``setting``) and ``layers.json``
(per-epoch Conv+ layer statistics). Writes the markdown and its plots: each task's score on its own axis with
95% confidence intervals, and, per task, how the learned blend moves over the epochs."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .runner import TASKS, slug
from .stats import paired, pooled_std, summarize, verdict
from .variants import VARIANT_NAMES, variants

BASELINES = ("conv", "attention-local", "attention-global")
LEARNED_BLEND = ("convplus-local", "convplus-global", "conv-to-convplus")
BLEND_PLOTTED = ("convplus-local", "convplus-global", "conv-to-convplus")


def score(record: dict) -> float:
    """A record's score (%): its top-1, or its mIoU on a segmentation task."""
    return record[record.get("metric", "top1")]


def metric_label(task: str) -> str:
    """What a task's scores are: 'top-1' or 'mIoU'."""
    return "mIoU" if task in TASKS and TASKS[task].metric == "miou" else "top-1"


def by_seed(records: list[dict], task: str, variant: str) -> dict[int, float]:
    return {r["seed"]: score(r) for r in records if r["task"] == task and r["variant"] == variant}


def task_order(records: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["task"] for r in records))
    return [t for t in TASKS if t in seen] + [t for t in seen if t not in TASKS]


def envelope(records: list[dict], task: str) -> str:
    """The best of conv and attention on ``task`` (by mean top-1)."""
    present = [v for v in BASELINES if by_seed(records, task, v)]
    return max(present, key=lambda v: statistics.fmean(by_seed(records, task, v).values()))


def floor_name(spec) -> str:
    """What a task's ``chance`` field is: chance for a local task, the ceiling of a model that never sees
    both decisive parts for a long-range one."""
    return "local ceiling" if spec.decided_by == "long range" else "chance"


def upper_envelope_table(records: list[dict]) -> str:
    """Task x variant (mean ± 95% CI over seeds) and the verdict of the better learned-blend Conv+."""
    names = [v for v in VARIANT_NAMES if any(r["variant"] == v for r in records)]
    lines = [
        "| task | " + " | ".join(names) + " | verdict (best of convplus-local/-global vs envelope) |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for task in task_order(records):
        cells = {v: summarize(list(by_seed(records, task, v).values())) for v in names if by_seed(records, task, v)}
        best = max(cells, key=lambda v: cells[v].mean)
        row = [f"**{cells[v]}**" if v == best else str(cells[v]) if v in cells else "—" for v in names]
        lines.append(f"| {task} | " + " | ".join(row) + f" | {_blend_verdict(records, task)} |")
    return "\n".join(lines)


def _blend_verdict(records: list[dict], task: str) -> str:
    candidates = [v for v in ("convplus-local", "convplus-global") if by_seed(records, task, v)]
    baseline = envelope(records, task)
    if not candidates:
        return "—"
    best = max(candidates, key=lambda v: statistics.fmean(by_seed(records, task, v).values()))
    return f"{best}: {verdict(paired(by_seed(records, task, best), by_seed(records, task, baseline)))} vs {baseline}"


def paired_table(records: list[dict], task: str) -> str:
    """Each Conv+ variant minus the task's envelope, paired by seed."""
    baseline = envelope(records, task)
    lines = [
        f"| {task}: variant − {baseline} (paired by seed) | difference (points, mean ± 95% CI) | verdict |",
        "|---|---|---|",
    ]
    for variant in (*LEARNED_BLEND, "fixed-blend", "seed-sketch"):
        mine = by_seed(records, task, variant)
        if mine:
            difference = paired(mine, by_seed(records, task, baseline))
            lines.append(f"| {variant} | {difference} | {verdict(difference)} |")
    return "\n".join(lines)


def details_table(records: list[dict], task: str, architectures: dict[str, dict]) -> str:
    """Per variant: mean ± std, 95% CI, seeds, params, receptive field, grids, seconds per run."""
    lines = [
        f"| {task}: variant | {metric_label(task)} mean ± std | 95% CI (within 0-100) | seeds | params | "
        "receptive field (px) | grids | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANT_NAMES:
        runs = [r for r in records if r["task"] == task and r["variant"] == variant]
        if not runs:
            continue
        s = summarize([score(r) for r in runs])
        arch = architectures.get(variant, {})
        grids = "/".join(str(g) for g in arch.get("grids", [])) or "—"
        lines.append(
            f"| {variant} | {s.mean:.2f} ± {s.std:.2f} | [{max(0.0, s.mean - s.ci):.2f}, "
            f"{min(100.0, s.mean + s.ci):.2f}] | {s.n} | "
            f"{runs[0]['params']:,} | {arch.get('receptive_field', '—')} | {grids} | "
            f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def separation(records: list[dict], task: str) -> tuple[float, str, str]:
    """(best - worst mean) / pooled std over the variants, and the best and worst variant."""
    groups = {v: list(by_seed(records, task, v).values()) for v in VARIANT_NAMES if by_seed(records, task, v)}
    means = {v: statistics.fmean(g) for v, g in groups.items()}
    best, worst = max(means, key=means.get), min(means, key=means.get)
    spread = pooled_std(list(groups.values()))
    return (means[best] - means[worst]) / spread if spread else math.inf, best, worst


def top1_plot(records: list[dict], path: Path) -> Path:
    """One panel per task, its own y range: each variant's mean with its 95% CI and the per-seed points."""
    tasks = task_order(records)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        names = [v for v in VARIANT_NAMES if by_seed(records, task, v)]
        for i, variant in enumerate(names):
            values = list(by_seed(records, task, variant).values())
            s = summarize(values)
            half = 0.0 if math.isnan(s.ci) else s.ci
            low, high = max(0.0, s.mean - half), min(100.0, s.mean + half)  # scores lie in [0, 100]
            ax.errorbar(i, s.mean, yerr=[[s.mean - low], [high - s.mean]], fmt="o", capsize=4, color=f"C{i}")
            ax.plot([i] * len(values), values, ".", color=f"C{i}", alpha=0.35)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task} ({TASKS[task].decided_by})" if task in TASKS else task, fontsize=9)
        ax.set_ylabel(f"{metric_label(task)} (%), mean and 95% CI (within 0-100)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def blend_plot(task: str, histories: dict[str, list[list[dict]]], path: Path) -> Path | None:
    """Per Conv+ layer, over the epochs (mean over seeds): mean attention gain and mean attention distance,
    one row per learned-blend variant."""
    shown = [v for v in BLEND_PLOTTED if any(histories.get(v, []))]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 2, figsize=(10, 3 * len(shown)), squeeze=False)
    for row, variant in zip(axes, shown, strict=True):
        curves = _layer_curves(histories[variant])
        for layer, (epochs, gains, distances) in curves.items():
            row[0].plot(epochs, gains, "o-", ms=3, label=layer)
            row[1].plot(epochs, distances, "o-", ms=3, label=layer)
        row[0].set(title=f"{task}, {variant}: attention gain (mean over heads)", xlabel="epoch", ylabel="g")
        row[1].set(title=f"{task}, {variant}: mean attention distance", xlabel="epoch", ylabel="grid cells")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _layer_curves(seed_histories: list[list[dict]]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """layer name -> (epochs, mean gain, mean distance), averaged over the seeds that have that epoch."""
    gains: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    distances: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for history in seed_histories:
        for entry in history:
            for layer in entry["layers"]:
                if layer["gains"]:
                    gains[layer["name"]][entry["epoch"]].append(statistics.fmean(layer["gains"]))
                if layer.get("mean_attention_distance") is not None:
                    distances[layer["name"]][entry["epoch"]].append(layer["mean_attention_distance"])
    curves = {}
    for name, per_epoch in gains.items():
        epochs = sorted(per_epoch)
        curves[name] = (
            epochs,
            [statistics.fmean(per_epoch[e]) for e in epochs],
            [statistics.fmean(distances[name][e]) if distances[name][e] else math.nan for e in epochs],
        )
    return curves


def final_blend(histories: dict[str, list[list[dict]]], variant: str) -> tuple[float, float] | None:
    """(mean |gain|, mean attention share) over layers and seeds at the last epoch, or None."""
    last = [h[-1]["layers"] for h in histories.get(variant, []) if h]
    if not last:
        return None
    gains = [abs(g) for layers in last for layer in layers for g in layer["gains"]]
    shares = [layer["attention_share"] for layers in last for layer in layers]
    return statistics.fmean(gains), statistics.fmean(shares)


def study_table(study: list[dict]) -> str:
    """The conversion study: each setting's top-1 and its attention share after fine-tuning."""
    lines = [
        "| setting | top-1 (mean ± 95% CI) | attention share at the end | mean abs gain at the end | seeds |",
        "|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in study):
        runs = [r for r in study if r["setting"] == setting]
        s = summarize([r["top1"] for r in runs])
        share = statistics.fmean(r["attention_share"] for r in runs)
        gain = statistics.fmean(r["mean_abs_gain"] for r in runs)
        lines.append(f"| {setting} | {s} | {100 * share:.1f}% | {gain:.3f} | {s.n} |")
    return "\n".join(lines)


def conclusions(records: list[dict], histories: dict) -> list[str]:
    """Statements that follow from the numbers: calibration, separation, verdicts, whether blends moved."""
    lines = []
    for task in task_order(records):
        spec = TASKS.get(task)
        ratio, best, worst = separation(records, task)
        best_mean = statistics.fmean(by_seed(records, task, best).values())
        if spec is not None:
            kept = "calibrated" if best_mean >= spec.level else "NOT calibrated (no variant reaches"
            lines.append(
                f"- **{task}** ({spec.decided_by}): best {best} {best_mean:.2f}% — {kept}"
                + (
                    f" {spec.level:.0f}%: this task separates nothing at this budget)"
                    if best_mean < spec.level
                    else f" (level {spec.level:.0f}%, {floor_name(spec)} {spec.chance:.0f}%)"
                )
                + f"; best − worst ({worst}) = {ratio:.1f} pooled std"
                + (" (separates)." if ratio > 3 else " (does not separate at 3 pooled std).")
            )
        lines.append(f"  Conv+ {_blend_verdict(records, task)}.")
        for variant in ("convplus-global", "conv-to-convplus"):
            moved = final_blend(histories.get(task, {}), variant)
            if moved:
                lines.append(
                    f"  {variant}: mean |g| {moved[0]:.3f}, attention share {100 * moved[1]:.1f}% at the last epoch."
                )
    return lines + across_tasks(records)


def across_tasks(records: list[dict]) -> list[str]:
    """The questions of the suite, task by task, as paired differences (points, mean ± 95% CI): does learning
    the blend matter (convplus-global - fixed-blend), what the definition buys over the seed sketch
    (convplus-global - seed-sketch), and where the converted model stands (conv-to-convplus - envelope)."""
    questions = {
        "Learning the blend (convplus-global − fixed-blend)": ("convplus-global", "fixed-blend"),
        "The definition over the seed sketch (convplus-global − seed-sketch)": ("convplus-global", "seed-sketch"),
        "Converted and fine-tuned (conv-to-convplus − envelope)": ("conv-to-convplus", None),
    }
    lines = ["", "Across tasks, paired by seed (points, mean ± 95% CI):", ""]
    for question, (mine, other) in questions.items():
        cells = []
        for task in task_order(records):
            baseline = other or envelope(records, task)
            if by_seed(records, task, mine) and by_seed(records, task, baseline):
                cells.append(f"{task} {paired(by_seed(records, task, mine), by_seed(records, task, baseline))}")
        if cells:
            lines.append(f"- {question}: " + "; ".join(cells) + ".")
    return lines


METHOD = """## Method

- **Backbones** (`convplus.ablation.backbones`). `isotropic` ({isotropic}): a 2x2 stride-2 patch stem and
  4 ConvNeXt blocks of width 24 on one 16x16 grid (32x32 images), 3x3 mixers, no GRN, and a head that
  normalises each cell before the average pool and the linear classifier, so the logit is a sum over cells
  of what each cell sees: a conv column sees 18 px (the receptive-field column of the tables), and a
  model none of whose cells sees both of two distant parts computes an additive function of them.
  On the segmentation task the column takes 64x64 images in 4x4 patches (again a 16x16 grid) and its
  last blocks' output goes, as a `features_only` backbone, under the semantic branch of Panoptic FPN
  (`convplus.models.create_segmenter`, FPN and head 32 channels wide) in place of the classifier head.
  `hierarchical` ({hierarchical}): ConvNeXt V2 with a 2x2 stem, stage grids 16/8/4/2, 7x7
  mixers; its GRN and pooled-then-normalised head are global, as in ConvNeXt V2.
- **Tasks** (cards in docs/datasets/), with the level (top-1, or mIoU) the best variant must reach for the
  task to count as calibrated, chance (local tasks; for segmentation, the mIoU of predicting the background
  everywhere) or the ceiling of a model that never sees both decisive parts
  at once (long-range tasks), and the training length:

{tasks}

- **Recipe.** AdamW, lr 3e-3, cosine schedule with 1 warm-up epoch, the epochs, batch sizes and training
  images above; 500 held-out images (digits: 450, shapes: 100). Seeds 0-4: a seed fixes the initialisation and the data
  order of every variant, so differences are paired by seed.
  `conv-to-convplus` starts from the same seed's trained `conv` model, converted exactly (gains 0,
  tau 1, global window), and fine-tunes as long as the others train (gains and temperatures at 10x lr), so
  it trains twice as long in all: where it leads, conversion and the longer training are not told apart
  (no conv was trained for the doubled length).
  The Conv+ variants trained from scratch also start at temperature 1.
- **Statistics** (`convplus.ablation.stats`). Mean, sample std and the 95% confidence interval (Student t)
  over seeds; paired differences against the better of conv and attention (the envelope); separation =
  (best - worst mean) / pooled std.

## Your data

`convplus ablate --data cifar10:PATH` (PATH holds `cifar-10-batches-py`, the python version from the
CIFAR-10 page) or `--data imagefolder:PATH` (PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg, the
ImageNet layout) trains the same eight variants at 32x32 for 10 epochs each, 5 seeds, with RGB
augmentation (random resized crops, flips). CIFAR-10 is 50,000 training images per epoch: 8 variants x 5
seeds x 10 epochs is 20 million image passes. {cifar_estimate}
`--seeds 2 --variants conv attention-global convplus-global` gives a first answer in a sixth of that;
`--backbone hierarchical|isotropic` picks the backbone (default for user data: the column).
"""


def cifar_estimate(records: list[dict]) -> str:
    """The time of the CIFAR-10 recipe at the training speed this run measured on the isotropic column."""
    rates = defaultdict(list)  # variant -> training images/s of one worker
    for r in records:
        if r["backbone"] == "isotropic" and r.get("metric", "top1") == "top1" and "images_per_second" in r:
            rates[r["variant"]].append(r["images_per_second"])
    if not rates:
        return "This run trained no model on the isotropic column, so it gives no estimate of that time."
    seconds = sum(50_000 * 10 * 5 / statistics.fmean(v) for v in rates.values()) / 2
    slowest, fastest = (f(statistics.fmean(v) for v in rates.values()) for f in (min, max))
    return (
        f"At the speed this run measured on the isotropic column ({slowest:.0f}-{fastest:.0f} images/s per "
        f"one-thread worker, training steps), two workers take about {seconds / 3600:.0f} hours, plus validation and "
        "the cost of decoding and augmenting RGB images (not measured; GPU times have not been measured either)."
    )


def method(records: list[dict]) -> str:
    """The method section, its task list and backbones read from ``TASKS``."""
    tasks = [
        f"  - `{name}` ({spec.decided_by}): {spec.description}. Level {spec.level:.0f}%, {floor_name(spec)} "
        f"{spec.chance:.0f}%; {spec.epochs} epochs of batch {spec.batch_size} on "
        + (f"{spec.max_train_samples} images" if spec.max_train_samples else "the whole training split")
        + "."
        for name, spec in TASKS.items()
    ]
    backbones = {
        b: ", ".join(t for t, spec in TASKS.items() if spec.backbone == b) for b in ("isotropic", "hierarchical")
    }
    return METHOD.format(tasks="\n".join(tasks), cifar_estimate=cifar_estimate(records), **backbones)


def write_report(results: Path, markdown: Path, command: str, minutes: float | None = None) -> Path:
    """Read ``results`` (a folder with results.json, architectures.json and layers.json), write the plots there
    and the markdown to ``markdown``."""
    everything = json.loads((results / "results.json").read_text())
    records = [r for r in everything if "setting" not in r]  # the suite; the others are the conversion study's
    study = [r for r in everything if "setting" in r]
    layers_file = results / "layers.json"
    histories = json.loads(layers_file.read_text()) if layers_file.is_file() else {}
    architectures = json.loads((results / "architectures.json").read_text())
    relative = Path(os.path.relpath(results.resolve(), markdown.resolve().parent))
    top1 = top1_plot(records, results / "top1.png")
    backbones = {r["task"]: r["backbone"] for r in records}
    variant_lines = []
    for backbone in dict.fromkeys(backbones.values()):
        tasks = ", ".join(t for t, b in backbones.items() if b == backbone)
        variant_lines += [f"Backbone `{backbone}` ({tasks}):\n"]
        variant_lines += [f"- `{v.name}`: {v.description}" for v in variants(backbone)] + [""]
    run_minutes = sum(r["train_seconds"] for r in everything) / 60
    timing = f" ({minutes:.0f} min; " if minutes is not None else " ("
    timing += f"the runs' own wall times sum to {run_minutes:.0f} min over the workers, reused runs included)"
    parts = [
        "# Ablations: Conv+ against convolution and attention\n",
        f"Command: `{command}`{timing}. Every number below is read from `{relative}/results.json` "
        "(one record per task, variant and seed, and per setting and seed of the conversion study); regenerate "
        f"this page from it with `convplus ablate --report {results} --markdown {markdown}`.\n",
        "## Upper envelope\n",
        "Top-1 (%) on the held-out split (mIoU (%) on the segmentation task), mean ± 95% confidence interval "
        "(Student t) over seeds; bold: the best "
        "variant. The verdict compares the better (by mean) of the two from-scratch Conv+ variants with the "
        "better of conv and attention, paired by seed (same initialisation stream and data order): it "
        "exceeds the envelope or falls short of it when the interval of the difference lies above or below "
        "0; when the interval contains 0 it reaches the envelope (mean difference >= 0) or is not shown to "
        "fall short (mean < 0: the seeds disagree).\n",
        upper_envelope_table(records),
        f"\n![top-1 per task]({relative}/{top1.name})\n",
        "## What the numbers say\n",
        *conclusions(records, histories),
        "",
        method(records),
        "## Variants\n",
        "The mixers at matched parameters (`convplus.ablation.variants`):\n",
        *variant_lines,
        "\n## Details per task\n",
    ]
    for task in task_order(records):
        arch = architectures.get(task, {})
        parts += [details_table(records, task, arch), "", paired_table(records, task), ""]
        plot = blend_plot(task, histories.get(task, {}), results / f"blend_{slug(task)}.png")
        if plot:
            parts.append(f"![how the blend moves on {task}]({relative}/{plot.name})\n")
    if study:
        parts += [
            "## `--replace-convplus` on trained weights: gain initialisation, gain learning rate, temperature\n",
            f"Task {study[0]['task']}: the same seed's trained conv model, converted (`conv-to-convplus`) and "
            "fine-tuned with each setting; the attention share is the attention term's share of the Conv+ "
            "layers' output energy on validation images.\n",
            study_table(study),
            "",
        ]
    markdown.write_text("\n".join(parts) + "\n")
    return markdown
