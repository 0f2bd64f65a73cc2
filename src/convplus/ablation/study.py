"""What ``--replace-convplus`` should do on trained weights: the same seed's trained conv model, converted
exactly and fine-tuned under each setting of the attention gain's start, the learning-rate multiplier of
gains and temperatures, and the initial temperature. The measured best (lr x10, tau 1) is the default of
``--replace-convplus`` with ``--pretrained-file`` (``TrainConfig.blend_lr_scale``, ``replace_convplus``)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from ..train import finished_summary, train
from .runner import Recipe, backbone_of, config, single_thread_pool, slug
from .variants import variants

SETTINGS: dict[str, dict] = {
    "g=0, lr x1, tau=10": {"convplus_lr_scale": 1.0, "temperature": 10.0},
    "g=0, lr x10, tau=10": {"convplus_lr_scale": 10.0, "temperature": 10.0},
    "g=0, lr x100, tau=10": {"convplus_lr_scale": 100.0, "temperature": 10.0},
    "g=0, lr x10, tau=1 (default)": {"convplus_lr_scale": 10.0, "temperature": 1.0},
    "g=0.1 (not exact), lr x1, tau=10": {"convplus_lr_scale": 1.0, "gain": 0.1, "temperature": 10.0},
}


def run_setting(task: str, setting: str, seed: int, recipe: Recipe, root: Path) -> dict:
    """One setting with one seed; needs the suite's ``conv`` run of that seed under ``root``. Its record:
    task, variant (conv-to-convplus), setting, seed, top1, attention_share and mean_abs_gain (last epoch, mean
    over layers), seconds."""
    converted = next(v for v in variants(backbone_of(task, recipe), recipe.heads) if v.finetune_from)
    options = SETTINGS[setting]
    base = config(task, converted, seed, recipe, root)
    convert = {**converted.convert_kwargs, **{k: options[k] for k in ("gain", "temperature") if k in options}}
    cfg = replace(
        base,
        output=str(Path(base.output).parent.parent / "study" / slug(setting) / f"seed{seed}"),
        convplus_kwargs=convert,
        convplus_lr_scale=options["convplus_lr_scale"],
    )
    summary = finished_summary(cfg) or train(cfg)
    layers = json.loads((Path(cfg.output) / "convplus_layers_epochs.json").read_text())[-1]["layers"]
    print(f"study {task} {setting:34s} seed {seed}: top-1 {summary['final_top1']:6.2f}%", flush=True)
    return {
        "task": task,
        "variant": converted.name,
        "setting": setting,
        "seed": seed,
        "top1": summary["final_top1"],
        "attention_share": statistics.fmean(layer["attention_share"] for layer in layers),
        "mean_abs_gain": statistics.fmean(abs(g) for layer in layers for g in layer["gains"]),
        "train_seconds": summary["wall_seconds"],
    }


def run_study(task: str, seeds: int, recipe: Recipe, root: Path, workers: int = 1) -> list[dict]:
    """Every setting x seed on ``task`` (in ``workers`` processes of one thread each): one record per run."""
    jobs = [(task, setting, seed, recipe, root) for seed in range(seeds) for setting in SETTINGS]
    if workers == 1:
        return [run_setting(*job) for job in jobs]
    with single_thread_pool(workers) as pool:
        return list(pool.map(run_setting, *zip(*jobs, strict=True)))
