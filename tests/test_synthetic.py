"""Generated datasets: deterministic, balanced, and the long-range tasks are not solvable from a local patch."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from convplus.data.synthetic import SYNTHETIC_DATASETS, build_synthetic, generate


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
    x_train, y_train = generate(name, "train", size=1500)
    x_test, y_test = generate(name, "test", size=500)
    probe = LogisticRegression(max_iter=2000).fit(features(x_train), y_train)
    return probe.score(features(x_test), y_test)


def _center_patch(x):
    return x[:, 13:19, 13:19].reshape(len(x), -1)


@pytest.mark.parametrize("name", ["longrange", "pathfinder"])
def test_long_range_tasks_defeat_a_local_patch_probe(name):
    assert _probe_accuracy(name, _center_patch) < 0.6


def test_texture_is_solved_from_a_local_patch():
    assert _probe_accuracy("texture", lambda x: np.abs(np.fft.fft2(x[:, 13:19, 13:19])).reshape(len(x), -1)) > 0.9


def test_longrange_label_is_recoverable_from_the_whole_image():
    """The task is learnable: matching the two glyph slots of the noise-free image recovers every label."""
    from convplus.data.synthetic import GLYPHS

    x, y = generate("longrange", "val", size=100)
    for image, label in zip(x, y, strict=True):
        scores = np.array(
            [[(image[i : i + 4, j : j + 4] * (2 * g - 1)).sum() for g in GLYPHS] for i in range(29) for j in range(29)]
        )  # (positions, glyphs)
        best = np.unravel_index(np.argsort(scores.max(1))[::-1], (29, 29))
        first = (best[0][0], best[1][0])
        second = next((a, b) for a, b in zip(*best, strict=True) if max(abs(a - first[0]), abs(b - first[1])) >= 16)
        glyphs = [scores[p[0] * 29 + p[1]].argmax() for p in (first, second)]
        assert (glyphs[0] == glyphs[1]) == bool(label)
