"""Generated datasets: deterministic and balanced; the long-range tasks' labels are recoverable from the whole
image but not from any window of the conv column's receptive field; texture is decided by a local patch."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier

from convplus.data.synthetic import PART_HEIGHT, STRIP, SYNTHETIC_DATASETS, build_synthetic, generate

RECEPTIVE_FIELD = 18  # px: the conv column of convplus.ablation (tests/test_ablation.py measures it)


@pytest.mark.parametrize("name", list(SYNTHETIC_DATASETS))
def test_deterministic_balanced_and_splits_differ(name):
    x1, y1 = generate(name, "val", seed=5, size=200)
    x2, y2 = generate(name, "val", seed=5, size=200)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(generate(name, "test", seed=5, size=200)[0], x1)
    assert not np.array_equal(generate(name, "val", seed=6, size=200)[0], x1)
    counts = np.bincount(y1, minlength=SYNTHETIC_DATASETS[name].num_classes)
    assert counts.max() - counts.min() <= 1
    image, label = build_synthetic(name, "val", seed=0)[0]
    assert image.shape == (1, 32, 32) and 0 <= int(label) < SYNTHETIC_DATASETS[name].num_classes


def _probe_accuracy(name: str, features) -> float:
    """Held-out accuracy of a one-hidden-layer MLP probe on ``features`` of the images: nonlinear, so it finds
    a part that tells the label up to its sign, not only a linear trace of it."""
    x_train, y_train = generate(name, "train", size=2000)
    x_test, y_test = generate(name, "test", size=500)
    probe = MLPClassifier((64,), alpha=1e-3, max_iter=400, random_state=0).fit(features(x_train), y_train)
    return probe.score(features(x_test), y_test)


def _blocks(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H/2 * W/2): the 2x2 block means (the ablation models' patch grid)."""
    n, h, w = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2).mean((2, 4)).reshape(n, -1)


@pytest.mark.parametrize("name", ["samediff", "xor"])
@pytest.mark.parametrize("columns", [slice(0, RECEPTIVE_FIELD), slice(32 - RECEPTIVE_FIELD, 32), slice(8, 26)])
def test_long_range_tasks_defeat_a_receptive_field_probe(name, columns):
    """A probe that sees one receptive field (all rows of an 18-px column band: more than any conv unit sees)
    is at chance: each band holds at most one of the two parts that decide the label."""
    assert _probe_accuracy(name, lambda x: _blocks(x[:, :, columns])) < 0.58


def test_the_probe_solves_xor_from_both_parts():
    """The band probe is strong enough to matter: on the two strips together it decides xor."""
    assert _probe_accuracy("xor", lambda x: _blocks(np.concatenate([x[:, :, :STRIP], x[:, :, -STRIP:]], 2))) > 0.9


def test_texture_is_solved_from_a_local_patch():
    assert _probe_accuracy("texture", lambda x: np.abs(np.fft.fft2(x[:, 13:19, 13:19])).reshape(len(x), -1)) > 0.9


def test_the_parts_are_farther_apart_than_the_receptive_field():
    """The columns where a part shows (a 2x2 block brighter than 0.75, 5 noise std, in 10% of the images)
    are the STRIP columns at each edge: 20 px apart."""
    for name in ("samediff", "xor"):
        x, _ = generate(name, "val", size=300)
        bright = np.abs(x.reshape(len(x), 16, 2, 16, 2).mean((2, 4))) > 0.75
        columns = 2 * np.flatnonzero(bright.any(1).mean(0) > 0.1)  # a block covers 2 px
        left, right = columns[columns < 16] + 1, columns[columns >= 16]
        assert right.min() - left.max() - 1 == 32 - 2 * STRIP > RECEPTIVE_FIELD


def _part_sign(side: np.ndarray) -> np.ndarray:
    """(N, 32, STRIP) -> (N,): the sign of the PART_HEIGHT-row window with the largest absolute sum."""
    sums = np.lib.stride_tricks.sliding_window_view(side.sum(2), PART_HEIGHT, axis=1).sum(2)  # (N, positions)
    return np.sign(np.take_along_axis(sums, np.abs(sums).argmax(1)[:, None], 1)[:, 0])


def test_labels_are_recoverable_from_the_whole_image():
    """samediff: the sign of the strongest part-sized window at each edge; xor: the signs of the strips'
    means."""
    x, y = generate("samediff", "val", size=300)
    assert np.array_equal(_part_sign(x[:, :, :STRIP]) == _part_sign(x[:, :, -STRIP:]), y == 1)
    x, y = generate("xor", "val", size=300)
    signs = [np.sign(x[:, :, part].mean((1, 2))) for part in (slice(0, STRIP), slice(-STRIP, None))]
    assert np.array_equal(signs[0] == signs[1], y == 1)
