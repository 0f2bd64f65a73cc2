"""PNG plots of a run: learning curves, per-layer Conv+ behaviour, confusion matrix, predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


def learning_curves(
    rows: list[dict],
    path: Path,
    metric: str = "top1",
    label: str = "top-1 accuracy (%)",
    limits: tuple[float, float] = (0.0, 100.0),
) -> Path:
    """Loss and ``metric`` per epoch, train vs validation (rows of metrics.csv; a series the rows lack is
    left out, e.g. a detector's validation loss)."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((ax_loss, "loss"), (ax_metric, metric)):
        for split, name in (("train", "train"), ("val", "validation")):
            if f"{split}_{key}" in rows[0]:
                ax.plot(epochs, [r[f"{split}_{key}"] for r in rows], "o-", label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch", ylabel=label, title=label.split(" (")[0].capitalize(), ylim=limits)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def convplus_behaviour(stats: list[dict], path: Path, title: str = "What each Conv+ layer learned") -> Path:
    """Per Conv+ layer: attention energy share (bars) and each head's gain (dots), on validation images."""
    names = [s["name"].replace(".blocks.", ".b").replace("stages.", "s").replace(".conv_dw", "") for s in stats]
    x = np.arange(len(stats))
    fig, (ax_share, ax_gain) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(stats) + 2), 6), sharex=True)
    shares = [100 * s["attention_share"] for s in stats]
    ax_share.bar(x, shares, color="tab:orange", label="attention term")
    ax_share.bar(x, [100 - v for v in shares], bottom=shares, color="tab:blue", label="convolution term")
    ax_share.set(ylabel="share of output energy (%)", ylim=(0, 100), title=title)
    ax_share.legend(loc="upper right", fontsize=8)
    for i, s in enumerate(stats):
        ax_gain.scatter([i] * len(s["gains"]), s["gains"], color="tab:orange", s=14)
    ax_gain.axhline(0, color="gray", lw=0.8)
    ax_gain.set(ylabel="attention gain g_k per head", xlabel="Conv+ layer (stage.block)")
    ax_gain.set_xticks(x, names, rotation=60, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, path: Path, class_names: list[str] | None = None) -> Path:
    """Rows = true class, columns = predicted, counts annotated."""
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    ax.imshow(matrix, cmap="Blues")
    labels = class_names or [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), labels)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct RGB colours (matplotlib's tab20, repeated), one per class."""
    return [tuple(int(255 * c) for c in plt.cm.tab20(i % 20)[:3]) for i in range(count)]


def image_grid(rows: list[list[torch.Tensor]], path: Path, titles: list[str]) -> Path:
    """Rows of (3, H, W) uint8 images side by side (e.g. ground truth | prediction), one title per column."""
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(3 * len(titles), 3 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes, strict=True):
        for image, ax in zip(row, ax_row, strict=True):
            ax.imshow(image.permute(1, 2, 0).cpu().numpy())
            ax.set_axis_off()
    for title, ax in zip(titles, axes[0], strict=True):
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
