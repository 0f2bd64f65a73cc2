"""Video: the moving-digits label needs the motion, the video networks (sizes, causality in time), and
``train --task video``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression

from convplus.data.moving_digits import DIRECTIONS, NUM_CLASSES, SPEEDS, MovingDigits
from convplus.models.video import VideoNet
from convplus.train import TrainConfig, train

TINY = {"dims": (8, 16), "depths": (1, 1), "heads": 2}


def clips(split: str, count: int, frames: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(count, frames, 32, 32) clips and their direction of motion."""
    data = MovingDigits(split, frames=frames, count=count)
    videos = np.stack([data[i][0][0].numpy() for i in range(count)])
    labels = np.array([data[i][1] for i in range(count)])
    return videos, labels % len(DIRECTIONS)


def motion_features(videos: np.ndarray) -> np.ndarray:
    """(N, directions * speeds): correlation of frame 1 with frame 0 moved by each candidate step."""
    return np.stack(
        [
            (np.roll(videos[:, 0], (s * dy, s * dx), axis=(1, 2)) * videos[:, 1]).sum((1, 2))
            for dy, dx in DIRECTIONS
            for s in SPEEDS
        ],
        1,
    )


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    model = LogisticRegression(max_iter=300).fit(train_x, train_y)
    return float((model.predict(val_x) == val_y).mean())


def test_one_frame_is_at_chance_on_the_direction_and_two_frames_tell_it():
    """A linear probe of single frames, at chance (1/4) +- 3 standard errors; of motion features, > 90%."""
    (train_v, train_dir), (val_v, val_dir) = clips("train", 600), clips("val", 300)
    for frame in (0, 1):
        single = probe(train_v[:, frame].reshape(600, -1), train_dir, val_v[:, frame].reshape(300, -1), val_dir)
        assert 0.25 - 0.075 < single < 0.25 + 0.075, f"frame {frame} alone tells the direction: {single:.2f}"
    motion = probe(motion_features(train_v), train_dir, motion_features(val_v), val_dir)
    assert motion > 0.9, f"the motion should tell the direction: {motion:.2f}"


def test_moving_digits_are_balanced_deterministic_and_split_digits():
    data = MovingDigits("val", frames=3, size=24, count=16)
    x = data[5][0]
    assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32
    assert torch.equal(x, MovingDigits("val", frames=3, size=24, count=16)[5][0])
    assert np.bincount([data[i][1] for i in range(16)], minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert not {image.tobytes() for image in MovingDigits("train").images} & {image.tobytes() for image in data.images}


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_video_networks_have_matched_parameter_counts(size):
    counts = [sum(p.numel() for p in timm.create_model(f"{k}_video_{size}").parameters()) for k in ("convplus", "conv")]
    assert abs(counts[0] - counts[1]) <= 0.02 * counts[1], counts


@pytest.mark.parametrize("mixer", ["convplus", "conv"])
def test_causal_time_features_at_frame_t_never_depend_on_later_frames(mixer):
    model = VideoNet(mixer, causal_time=True, global_stages=(1,), **TINY).eval()
    clip = torch.randn(1, 1, 6, 16, 16)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.stages(model.stem(x))

    before = features(clip)
    changed = clip.clone()
    changed[:, :, 3:] = torch.randn_like(changed[:, :, 3:])
    after = features(changed)
    torch.testing.assert_close(after[:, :, :3], before[:, :, :3], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, :, 3:], before[:, :, 3:])


def test_train_video_task(tmp_path):
    cfg = TrainConfig(
        task="video",
        model="conv_video_tiny",
        model_kwargs=TINY,
        data="synthetic:moving-digits",
        frames=4,
        img_size=16,
        epochs=1,
        batch_size=8,
        max_train_samples=32,
        max_val_samples=16,
        warmup_epochs=0,
        output=str(tmp_path / "run"),
        quiet=True,
    )
    summary = train(cfg)
    assert 0 <= summary["top1"] <= 100 and (tmp_path / "run" / "learning_curves.png").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["frames"] == 4
    with pytest.raises(ValueError, match="not a video dataset"):
        train(TrainConfig(task="video", data="digits", output=str(tmp_path / "bad")))
