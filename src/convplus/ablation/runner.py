"""Run the ablation: every variant x seed on one task, through the trainer; collect summaries.

Each run is ``convplus.train.train`` with one recipe; ``conv-to-convplus`` starts from the same seed's
``conv`` run (``--pretrained-file`` + exact ``--replace-convplus``) and fine-tunes for ``finetune_epochs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..analysis import attention_distance, layer_behaviour
from ..train import TrainConfig, load_run, train
from .variants import BACKBONE, VARIANTS

TASKS = ("digits", "texture", "longrange", "pathfinder")


@dataclass(frozen=True)
class Recipe:
    """Training settings shared by every variant."""

    epochs: int = 12
    finetune_epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    max_train_samples: int | None = None
    max_val_samples: int | None = None


FULL = Recipe()
QUICK = Recipe(epochs=1, finetune_epochs=1, max_train_samples=192, max_val_samples=128)


def data_form(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)} or 'all', got {task!r}")
    return "digits" if task == "digits" else f"synthetic:{task}"


def run_variant(task: str, variant, seed: int, recipe: Recipe, root: Path) -> dict:
    """Train one variant on one task with one seed; returns its summary plus per-layer interpretation."""
    output = root / task / variant.name / f"seed{seed}"
    cfg = TrainConfig(
        model=variant.model,
        data=data_form(task),
        img_size=32,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup_epochs=1 if recipe.epochs > 2 else 0,
        seed=seed,
        output=str(output),
        overwrite=True,
        quiet=True,
        model_kwargs={**BACKBONE, **variant.model_kwargs},
        replace_convplus=variant.replace_convplus,
        convplus_kwargs=variant.convplus_kwargs,
        max_train_samples=recipe.max_train_samples,
        max_val_samples=recipe.max_val_samples,
    )
    if variant.finetune_from:
        source = root / task / variant.finetune_from / f"seed{seed}" / "last" / "model.safetensors"
        cfg = replace(cfg, model="convnextv2_atto", pretrained_file=str(source), epochs=recipe.finetune_epochs)
    summary = train(cfg)
    summary["layers"] = _interpret(output)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _interpret(output: Path) -> list[dict]:
    """Per Conv+ layer of the trained model: gains, attention energy share, mean attention distance."""
    run = load_run(output, "last", max_val=32)
    images = torch.stack([run.data.val[i][0] for i in range(len(run.data.val))])
    stats = layer_behaviour(run.model, images)
    distances = attention_distance(run.model, images[:8])
    for layer in stats:
        layer["mean_attention_distance"] = distances.get(layer["name"])
    return stats


def run_task(task: str, seeds: int, recipe: Recipe, root: Path) -> dict[str, list[dict]]:
    """Every variant x seed on ``task`` -> {variant name: [summary per seed]}."""
    results: dict[str, list[dict]] = {v.name: [] for v in VARIANTS}
    for seed in range(seeds):
        for variant in VARIANTS:  # 'conv' runs before the variant fine-tuned from it
            summary = run_variant(task, variant, seed, recipe, root)
            results[variant.name].append(summary)
            print(
                f"{task:10s} {variant.name:22s} seed {seed}: top-1 {summary['final_top1']:6.2f}%  "
                f"{summary['wall_seconds']:6.1f}s",
                flush=True,
            )
    return results
