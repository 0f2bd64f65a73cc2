"""The training loop: ``train(cfg) -> summary``, the same for every task. Read it top to bottom:

1. set up (processes, checks, seeds), 2. data, 3. model (the task supplies both), 4. optimizer / scheduler /
EMA, then the output folder (nothing is written before), 5. resume, 6. per epoch: train, evaluate, log,
checkpoint, 7. summary and plots.

The task (``tasks.Task``: classification, detection, segmentation) turns batches into losses, evaluates,
and draws its own pictures.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .. import analysis
from ..flops import count_flops
from . import checkpoint, distributed, plots
from .config import TrainConfig
from .data import DataSplits
from .sampling import SeededDataset, SeededSampler
from .tasks import Task, autocast, task_class


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_output(cfg: TrainConfig) -> None:
    """Refuse a run folder that holds another run unless --resume or --overwrite; --resume needs a run."""
    out = Path(cfg.output)
    holds_files = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: exists and is not a folder")
    if holds_files and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"--output {out}: output folder already holds a run; pass --resume to continue it or --overwrite "
            "to replace it"
        )
    if cfg.resume and checkpoint.find(out / "last") is None:
        raise ValueError(f"--output {out}: nothing to resume (no complete checkpoint in {out / 'last'})")


def prepare_output(cfg: TrainConfig) -> Path:
    """The run folder, emptied for --overwrite (call after ``check_output``)."""
    out = Path(cfg.output)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def removed_unless_checkpointed(out: Path, existed: bool):
    """On any failure before the run's first checkpoint, put the run folder back as it was (absent or empty),
    so that the corrected command starts afresh; a run with a checkpoint is kept for --resume."""
    try:
        yield
    except BaseException:
        if checkpoint.find(out / "last") is None:
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir()
        raise


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_data(cfg: TrainConfig) -> DataSplits:
    """The data of ``cfg.data`` for ``cfg.task``."""
    return task_class(cfg.task).build_data(cfg)


def build_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """The model of ``cfg.task`` for this data (``cfg.model`` names the network or backbone), or a ValueError
    naming the setting that does not fit."""
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"--model {cfg.model!r}: unknown model{hint}")
    try:
        return task_class(cfg.task)(cfg, data, torch.device("cpu")).build_model()
    except TypeError as error:  # a keyword the model's constructor or the Conv+ layers do not take
        raise ValueError(
            f"--model-kwargs {cfg.model_kwargs} / --convplus-kwargs {cfg.convplus_kwargs}: not accepted by "
            f"{cfg.model} ({error})"
        ) from error


def loaders(
    task: Task, cfg: TrainConfig, ctx: distributed.Context
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Training batches sharded over ranks (each rank gets batch_size / world_size of every global batch,
    the same global batches as one process, augmented the same way), and validation shards without padding."""
    data = task.data
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {ctx.world_size}")
    sampler = SeededSampler(data.train, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_rank = cfg.batch_size // ctx.world_size
    train = DataLoader(
        SeededDataset(data.train),
        per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,  # fresh workers every epoch, seeded from the (checkpointed) torch RNG: exact resume
        collate_fn=task.collate,
    )
    if len(train) == 0:
        raise ValueError(f"{cfg.data}: {len(data.train)} training images is less than one batch of {cfg.batch_size}")
    val_shard: Dataset = Subset(data.val, range(ctx.rank, len(data.val), ctx.world_size))
    val = DataLoader(val_shard, per_rank, shuffle=False, num_workers=cfg.workers, collate_fn=task.collate)
    return train, val, sampler


def train_one_epoch(task: Task, model, loader, optimizer, scheduler, ema, scaler, epoch, cfg, ctx) -> dict[str, float]:
    """One pass over the training shard; returns the means of the task's ``train_keys``, images/s and
    seconds (all ranks)."""
    model.train()
    updates_per_epoch = len(loader)
    keys = (*task.train_keys, "n")
    totals = torch.zeros(len(keys), dtype=torch.float64)
    start = time.perf_counter()
    show = ctx.is_main and not cfg.quiet and sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
    for step, batch in enumerate(bar):
        loss, sums = task.step(model, batch)
        finite = distributed.all_reduce_sum(torch.tensor([float(torch.isfinite(loss))]), ctx)
        if finite.item() < ctx.world_size:
            kept = f"The last good checkpoint is in {Path(cfg.output) / 'last'}" if epoch else "No checkpoint yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. {kept} (try a lower --lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(num_updates=epoch * updates_per_epoch + step + 1)
        if ema is not None:
            ema.update(model.module if isinstance(model, DistributedDataParallel) else model)
        totals += torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        shown = {k: f"{sums[k] / sums['n']:.3f}" for k in task.train_keys[:2]}
        bar.set_postfix(**shown, img_s=f"{totals[-1] / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    reduced = distributed.all_reduce_sum(totals, ctx).tolist()
    count = reduced[-1]
    means = {k: v / count for k, v in zip(task.train_keys, reduced, strict=False)}
    return {**means, "images_per_s": count / seconds, "seconds": seconds}


def train(cfg: TrainConfig) -> dict:
    """Run one training as configured; returns the summary (also written to <output>/summary.json).

    Settings, output folder, data, model and optimizer are all checked (``ValueError``) before anything is
    written; a run that fails before its first checkpoint leaves the output folder as it found it.
    """
    # 1. set up
    cfg.check()
    ctx = distributed.setup()
    try:
        with contextlib.ExitStack() as on_failure:
            return _train(cfg, ctx, on_failure)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.Context, on_failure: contextlib.ExitStack) -> dict:
    wall_start = time.perf_counter()
    out = Path(cfg.output)
    check_output(cfg)
    autocast(cfg, ctx.device)  # refuses an AMP mode this device cannot run
    seed_everything(cfg.seed, cfg.deterministic)

    # 2. data
    cls = task_class(cfg.task)
    data = build_data(cfg)
    task = cls(cfg, data, ctx.device)
    train_loader, val_loader, sampler = loaders(task, cfg, ctx)

    # 3. model
    model = build_model(cfg, data).to(ctx.device)
    params = sum(p.numel() for p in model.parameters())
    inputs = task.inputs(1)
    try:
        flops = count_flops(model, inputs)
    except RuntimeError as error:
        shape = "x".join(map(str, inputs[0].shape))  # the first image, (C, H, W)
        raise ValueError(
            f"--model {cfg.model} cannot run on {shape} images ({str(error).splitlines()[0]}); try a larger --img-size"
        ) from error
    net = DistributedDataParallel(model) if ctx.distributed else model

    # 4. optimizer, schedule, EMA
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.lr * 0.01,
        min_lr=cfg.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    ema = ModelEmaV3(model, decay=cfg.ema) if cfg.ema else None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")

    # everything is checked: only now is the run folder written
    existed = out.exists()
    if ctx.is_main:
        prepare_output(cfg)
        if not cfg.resume:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        on_failure.enter_context(removed_unless_checkpointed(out, existed))
    distributed.barrier(ctx)

    # 5. resume
    start_epoch, best, rows = 0, {"epoch": 0, "val": {}}, []
    if cfg.resume:
        found = checkpoint.find(out / "last")
        state = checkpoint.load(found, model, ema.module if ema else None)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, rows = state["epoch"] + 1, state["best"], state["rows"]
        checkpoint.set_rng_state(state["rng"])

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    # 6. epochs
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(task, net, train_loader, optimizer, scheduler, ema, scaler, epoch, cfg, ctx)
        scheduler.step(epoch + 1)
        val = task.evaluate(net, val_loader, ctx)
        ema_val = task.evaluate(ema.module, val_loader, ctx) if ema else None
        row = {
            "epoch": epoch + 1,
            **{f"train_{k}": stats[k] for k in task.train_keys},
            **{f"val_{k}": val[k] for k in task.val_keys},
            f"ema_val_{task.best_key}": ema_val[task.best_key] if ema_val else "",
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": stats["images_per_s"],
            "epoch_seconds": stats["seconds"],
        }
        rows.append(row)
        is_best = best["epoch"] == 0 or task.improves(val[task.best_key], best["val"][task.best_key])
        if is_best:
            best = {"epoch": epoch + 1, "val": {k: val[k] for k in task.val_keys}}
        if ctx.is_main:
            _log(writer, out, rows, row, cfg, task)
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best": best,
                "rows": rows,
                "rng": checkpoint.rng_state(),
                "config": cfg.to_dict(),
            }
            checkpoint.save(out / "last", model, ema.module if ema else None, state)
            if is_best:
                checkpoint.save(out / "best", model, ema.module if ema else None, state)
        distributed.barrier(ctx)

    # 7. summary and plots
    final = {k: rows[-1][f"val_{k}"] for k in task.summary_keys} if rows else {}
    summary = {
        "task": cfg.task,
        "model": cfg.model,
        "data": cfg.data,
        "params": params,
        "flops": flops,
        **final,
        **{f"best_{k}": best["val"].get(k) for k in task.summary_keys},
        "best_epoch": best["epoch"],
        **{f"final_{k}": final.get(k) for k in task.summary_keys},
        "epochs": cfg.epochs,
        "wall_seconds": time.perf_counter() - wall_start,
        "corrupt_images": data.corrupt_images,
        "world_size": ctx.world_size,
        "output": str(out),
    }
    if ctx.is_main:
        writer.close()
        summary["plots"] = _plots(task, model, rows, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _log(writer, out: Path, rows: list[dict], row: dict, cfg: TrainConfig, task: Task) -> None:
    """metrics.csv (rewritten whole: a resumed run keeps one row per epoch), TensorBoard, one printed line."""
    with open(out / "metrics.csv", "w", newline="") as f:
        csv_writer = csv.DictWriter(f, fieldnames=task.columns())
        csv_writer.writeheader()
        csv_writer.writerows(rows)
    scalars = [k for k in task.columns() if k.startswith(("train_", "val_"))] + ["lr", "images_per_s"]
    for key in scalars:
        writer.add_scalar(key, row[key], row["epoch"])
    if not cfg.quiet:
        train = " ".join(f"{k} {row[f'train_{k}']:.4g}" for k in task.train_keys)
        val = " ".join(f"{k} {row[f'val_{k}']:.4g}" for k in task.val_keys)
        print(
            f"epoch {row['epoch']}/{cfg.epochs}  train {train}  | val {val}"
            f"  | lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['epoch_seconds']:.1f}s",
            flush=True,
        )


def _plots(task: Task, model: nn.Module, rows: list[dict], out: Path) -> dict:
    """learning_curves.png, convplus_layers.png for a model with Conv+ layers (on up to 64 validation images),
    and the task's own pictures."""
    written = {}
    if rows:
        metric, label, limits = task.curve
        curves = plots.learning_curves(rows, out / "learning_curves.png", metric, label, limits)
        written["learning_curves"] = str(curves)
    stats = analysis.layer_behaviour(model, task.inputs(task.sample_images))
    if stats:
        (out / "convplus_layers.json").write_text(json.dumps(stats, indent=2) + "\n")
        written["convplus_layers"] = str(plots.convplus_behaviour(stats, out / "convplus_layers.png"))
    written.update(task.plots(model, out))
    return written
