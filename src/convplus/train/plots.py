"""PNG plots of a run: learning curves, per-layer Conv+ behaviour, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def learning_curves(rows: list[dict], path: Path) -> Path:
    """Loss and top-1 accuracy per epoch, train vs validation (rows of metrics.csv)."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [r["train_top1"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["val_top1"] for r in rows], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
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
