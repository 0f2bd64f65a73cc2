"""The trainer: real on-disk formats, torchrun equivalence, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convplus.cli import main as cli_main
from convplus.train import TrainConfig, TrainingDiverged, train

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    base = TrainConfig(
        model="convnextv2_atto",
        model_kwargs=TINY,
        data="digits",
        img_size=32,
        epochs=1,
        batch_size=32,
        max_train_samples=128,
        max_val_samples=64,
        output=str(tmp_path / name),
        quiet=True,
        warmup_epochs=0,
    )
    return dataclasses.replace(base, **overrides)


def _write_image_folder(root: Path, corrupt: int = 0) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / "cat" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_imagefolder_trains_and_skips_corrupt_images(tmp_path):
    _write_image_folder(tmp_path / "data", corrupt=2)
    cfg = tiny_config(
        tmp_path,
        "run",
        data=f"imagefolder:{tmp_path / 'data'}",
        max_train_samples=None,
        max_val_samples=None,
        batch_size=8,
    )
    with pytest.warns(UserWarning, match="skipping 2 corrupt image"):
        summary = train(cfg)
    assert summary["corrupt_images"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["corrupt_images"] == 2


def test_cifar_pickle_folder_trains(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(8), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(8), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    cfg = tiny_config(tmp_path, "run", data=f"cifar10:{tmp_path / 'cifar'}", max_train_samples=None, batch_size=8)
    # torchvision checks the files' MD5 sums against the official release; these files are made here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
        summary = train(cfg)
    assert summary["final_top1"] is not None and (tmp_path / "run" / "last" / "model.safetensors").is_file()


def test_run_folder_contents_and_eval(tmp_path):
    cfg = tiny_config(tmp_path, "run", model="convplus_convnextv2_atto", epochs=2, ema=0.9)
    summary = train(cfg)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "metrics.csv",
        "summary.json",
        "learning_curves.png",
        "convplus_layers.png",
        "last/model.safetensors",
        "last/ema.safetensors",
        "last/state.pt",
        "best/model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    assert summary["params"] > 0 and summary["flops"] > 0 and 0 <= summary["best_top1"] <= 100
    assert cli_main(["eval", "--checkpoint", str(run)]) == 0
    assert (run / "eval" / "confusion_matrix.png").is_file()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset form"):
        train(tiny_config(tmp_path, "a", data="mnist"))
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_config(tmp_path, "b", data=f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match="empty"):
        train(tiny_config(tmp_path, "c", data=f"imagefolder:{tmp_path / 'empty'}"))
    train(tiny_config(tmp_path, "d"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tmp_path, "d", lr=1e-4))
    train(tiny_config(tmp_path, "d", lr=1e-4, overwrite=True))
    with pytest.raises(ValueError, match="does not fit"):  # a checkpoint from another model
        train(
            tiny_config(
                tmp_path, "d", model_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 48]}, epochs=2, resume=True
            )
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """Fault injection: the model's training outputs turn NaN after epoch 1 (4 steps of 32 images)."""
    from convplus.train import engine

    build = engine.build_model

    def diverging_model(cfg, data):
        model = build(cfg, data)
        steps = [0]

        def hook(module, args, out):
            if module.training:
                steps[0] += 1
                return out * float("nan") if steps[0] > 4 else out
            return out

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", diverging_model)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 1"):
        train(tiny_config(tmp_path, "run", epochs=3))
    state = torch.load(tmp_path / "run" / "last" / "state.pt", weights_only=False)
    assert state["epoch"] == 0  # the checkpoint of epoch 1, complete and untouched
    weights = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _train_cmd(output: Path, *launcher: str, **flags: str) -> list[str]:
    """``launcher train.py`` with the tiny test settings; ``flags`` (``img_size="32"``) replace or add flags."""
    settings = {
        "model": "convnextv2_atto",
        "model_kwargs": json.dumps(TINY),
        "data": "digits",
        "img_size": "32",
        "batch_size": "32",
        "max_train_samples": "512",
        "max_val_samples": "64",
        "lr": "1e-3",
        "warmup_epochs": "0",
        "seed": "3",
        "output": str(output),
        **flags,
    }
    args = [arg for name, value in settings.items() for arg in ("--" + name.replace("_", "-"), value)]
    return [*launcher, str(ROOT / "train.py"), *args, "--deterministic", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def test_torchrun_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_train_cmd(one, sys.executable, epochs="2"), check=True, env=_env())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731"]
    subprocess.run(_train_cmd(two, *torchrun, epochs="2"), check=True, env=_env())
    a, b = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    """Every source of randomness on: augmentation in a data-loader worker, drop-path, mixup and cutmix."""
    _write_image_folder(tmp_path / "data")
    random_run = {
        "data": f"imagefolder:{tmp_path / 'data'}",
        "batch_size": "8",
        "workers": "1",
        "drop_path": "0.2",
        "mixup": "0.8",
        "cutmix": "1.0",
    }
    assert_resume_equals_uninterrupted(tmp_path, random_run, epochs=4)


def kill_mid_run(process: subprocess.Popen, metrics: Path, timeout: float) -> int:
    """SIGKILL a training ``process`` half of its first epoch's ``epoch_seconds`` after that epoch's row reaches
    ``metrics`` (into the middle of the next epoch, however fast the epochs are); the epochs it finished."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    with metrics.open() as rows:
        first_epoch = float(next(csv.DictReader(rows))["epoch_seconds"])
    time.sleep(first_epoch / 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(metrics.read_text().splitlines()) - 1


def assert_resume_equals_uninterrupted(tmp_path: Path, flags: dict[str, str], epochs: int) -> None:
    """``train.py`` with ``flags`` (``_train_cmd``), SIGKILLed after its first epoch and resumed, ends with the
    weights of the same run left alone, and one metrics row per epoch."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = _train_cmd(killed, sys.executable, **flags, epochs=str(epochs))
    metrics = killed / "metrics.csv"
    done = kill_mid_run(subprocess.Popen(cmd, env=_env()), metrics, timeout=120)
    assert 1 <= done < epochs, "the kill should land mid-run"
    subprocess.run([*cmd, "--resume"], check=True, env=_env())
    subprocess.run(_train_cmd(full, sys.executable, **flags, epochs=str(epochs)), check=True, env=_env())
    a, b = load_file(full / "last" / "model.safetensors"), load_file(killed / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert len(metrics.read_text().splitlines()) == epochs + 1
