"""The training loop: ``train(cfg) -> summary``. Read it top to bottom:

1. set up (processes, checks, seeds), 2. data, 3. model, 4. optimizer / scheduler / EMA / mixup / loss, then
the output folder (nothing is written before), 5. resume, 6. per epoch: train, evaluate, log, checkpoint,
7. summary and plots.
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
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
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
from ..models import load_pretrained, replace_convplus
from . import checkpoint, distributed, plots
from .config import TrainConfig
from .data import DataSplits, build_data

METRICS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_top1",
    "lr",
    "images_per_s",
    "epoch_seconds",
)


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


def build_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """timm model (+ Conv+ replacement, + weights from a local file) for this data's classes and channels."""
    kwargs = {"num_classes": data.num_classes, "in_chans": data.in_chans, **cfg.model_kwargs}
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"--model {cfg.model!r}: unknown model{hint}")
    try:
        model = timm.create_model(cfg.model, pretrained=False, **kwargs)
    except TypeError as error:  # a keyword the model's constructor does not take
        raise ValueError(f"--model-kwargs {cfg.model_kwargs}: not accepted by {cfg.model} ({error})") from error
    if cfg.pretrained_file:  # into the plain model, before the exact conversion (which keeps its outputs)
        load_pretrained(model, cfg.pretrained_file)
    if cfg.replace_convplus:
        try:
            replace_convplus(model, stages=cfg.convplus_stages, **cfg.convplus_kwargs)
        except TypeError as error:
            raise ValueError(f"--convplus-kwargs {cfg.convplus_kwargs}: {error}") from error
    return model


def loaders(
    data: DataSplits, cfg: TrainConfig, ctx: distributed.Context
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Training batches sharded over ranks (each rank gets batch_size / world_size of every global batch,
    the same global batches as one process), and validation shards without padding."""
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {ctx.world_size}")
    sampler = DistributedSampler(data.train, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_rank = cfg.batch_size // ctx.world_size
    train = DataLoader(
        data.train,
        per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,  # fresh workers every epoch, seeded from the (checkpointed) torch RNG: exact resume
    )
    if len(train) == 0:
        raise ValueError(f"{cfg.data}: {len(data.train)} training images is less than one batch of {cfg.batch_size}")
    val_shard: Dataset = Subset(data.val, range(ctx.rank, len(data.val), ctx.world_size))
    val = DataLoader(val_shard, per_rank, shuffle=False, num_workers=cfg.workers)
    return train, val, sampler


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, ctx: distributed.Context) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the whole validation set, summed across ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        with autocast(cfg, ctx.device):
            logits = model(images).float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = topk == labels[:, None]
        totals += torch.tensor(
            [
                F.cross_entropy(logits, labels, reduction="sum").item(),
                hits[:, 0].sum().item(),
                hits.any(1).sum().item(),
                len(labels),
            ],
            dtype=torch.float64,
        )
    loss, top1, top5, count = distributed.all_reduce_sum(totals, ctx).tolist()
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, mixup, ema, scaler, epoch, cfg, ctx) -> dict:
    """One pass over the training shard; returns mean loss, top-1 (%) and images/s (all ranks)."""
    model.train()
    updates_per_epoch = len(loader)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, top-1 hits, count
    start = time.perf_counter()
    show = ctx.is_main and not cfg.quiet and sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        with autocast(cfg, ctx.device):
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
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
        batch = torch.tensor(
            [loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64
        )
        totals += batch
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            acc=f"{100 * batch[1] / batch[2]:.1f}",
            img_s=f"{totals[2] / (time.perf_counter() - start):.0f}",
        )
    seconds = time.perf_counter() - start
    loss_sum, hits, count = distributed.all_reduce_sum(totals, ctx).tolist()
    return {"loss": loss_sum / count, "top1": 100 * hits / count, "images_per_s": count / seconds, "seconds": seconds}


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
    data = build_data(cfg.data, cfg.img_size, cfg.seed, cfg.max_train_samples, cfg.max_val_samples)
    train_loader, val_loader, sampler = loaders(data, cfg, ctx)

    # 3. model
    model = build_model(cfg, data).to(ctx.device)
    params = sum(p.numel() for p in model.parameters())
    try:
        flops = count_flops(model, torch.zeros(1, data.in_chans, cfg.img_size, cfg.img_size, device=ctx.device))
    except RuntimeError as error:
        raise ValueError(
            f"--model {cfg.model} cannot run on {data.in_chans}x{cfg.img_size}x{cfg.img_size} images "
            f"({str(error).splitlines()[0]})"
        ) from error
    net = DistributedDataParallel(model) if ctx.distributed else model

    # 4. optimizer, schedule, EMA, mixup, loss
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
    mixup = None
    if cfg.mixup or cfg.cutmix:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=data.num_classes,
        )
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif cfg.label_smoothing:
        loss_fn = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
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
    start_epoch, best, rows = 0, {"val_top1": -1.0, "val_top5": 0.0, "epoch": 0}, []
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
        stats = train_one_epoch(net, train_loader, optimizer, scheduler, loss_fn, mixup, ema, scaler, epoch, cfg, ctx)
        scheduler.step(epoch + 1)
        val = evaluate(net, val_loader, cfg, ctx)
        ema_val = evaluate(ema.module, val_loader, cfg, ctx) if ema else None
        row = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "train_top1": stats["top1"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "ema_val_top1": ema_val["top1"] if ema_val else "",
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": stats["images_per_s"],
            "epoch_seconds": stats["seconds"],
        }
        rows.append(row)
        is_best = val["top1"] > best["val_top1"]
        if is_best:
            best = {"val_top1": val["top1"], "val_top5": val["top5"], "epoch": epoch + 1}
        if ctx.is_main:
            _log(writer, out, rows, row, cfg)
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
    summary = {
        "model": cfg.model,
        "data": cfg.data,
        "params": params,
        "flops": flops,
        "best_top1": best["val_top1"],
        "best_top5": best["val_top5"],
        "best_epoch": best["epoch"],
        "final_top1": rows[-1]["val_top1"] if rows else None,
        "final_top5": rows[-1]["val_top5"] if rows else None,
        "epochs": cfg.epochs,
        "wall_seconds": time.perf_counter() - wall_start,
        "corrupt_images": data.corrupt_images,
        "world_size": ctx.world_size,
        "output": str(out),
    }
    if ctx.is_main:
        writer.close()
        summary["plots"] = _plots(model, data, rows, out, ctx)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _log(writer, out: Path, rows: list[dict], row: dict, cfg: TrainConfig) -> None:
    """metrics.csv (rewritten whole: a resumed run keeps one row per epoch), TensorBoard, one printed line."""
    with open(out / "metrics.csv", "w", newline="") as f:
        csv_writer = csv.DictWriter(f, fieldnames=METRICS)
        csv_writer.writeheader()
        csv_writer.writerows(rows)
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        writer.add_scalar(key, row[key], row["epoch"])
    if not cfg.quiet:
        print(
            f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.3f} top-1 {row['train_top1']:.1f}%"
            f"  | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
            f"  | lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['epoch_seconds']:.1f}s",
            flush=True,
        )


def _plots(model: nn.Module, data: DataSplits, rows: list[dict], out: Path, ctx: distributed.Context) -> dict:
    """learning_curves.png, and convplus_layers.png for a model with Conv+ layers (on 64 validation images)."""
    written = {}
    if rows:
        written["learning_curves"] = str(plots.learning_curves(rows, out / "learning_curves.png"))
    images = torch.stack([data.val[i][0] for i in range(min(64, len(data.val)))]).to(ctx.device)
    stats = analysis.layer_behaviour(model, images)
    if stats:
        (out / "convplus_layers.json").write_text(json.dumps(stats, indent=2) + "\n")
        written["convplus_layers"] = str(plots.convplus_behaviour(stats, out / "convplus_layers.png"))
    return written
