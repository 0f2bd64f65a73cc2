"""``make run``'s figure: both runs' validation curves from their metrics.csv, the table's numbers beside them."""

from __future__ import annotations

import csv

from PIL import Image

from convplus.train import compare

METRICS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
)  # metrics.csv of a classification run


def _run(folder, val_top1: list[float], seconds: float, params: int) -> dict:
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(
            {key: 0.0 for key in METRICS} | {"epoch": i + 1, "val_top1": v} for i, v in enumerate(val_top1)
        )
    return {"output": str(folder), "final_top1": val_top1[-1], "wall_seconds": seconds, "params": params}


def test_comparison_plot_shows_both_curves_and_the_table(tmp_path, monkeypatch):
    results = {
        "Conv+ atto": _run(tmp_path / "a", [40.0, 70.5, 91.25], 80.0, 3_400_000),
        "atto": _run(tmp_path / "b", [35.0, 60.0], 65.0, 3_390_000),
    }
    figures = []
    monkeypatch.setattr(compare.plt, "close", figures.append)
    path = compare.comparison_plot(results, tmp_path / "comparison.png")
    with Image.open(path) as image:
        assert image.width > 400 and image.height > 300
    (ax,) = figures[0].axes
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[40.0, 70.5, 91.25], [35.0, 60.0]]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2, 3], [1, 2]]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [
        "Conv+ atto: top-1 91.25%, 80 s, 3.40M params",
        "atto: top-1 60.00%, 65 s, 3.39M params",
    ]
