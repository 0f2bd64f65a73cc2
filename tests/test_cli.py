"""The ``convplus`` command on bad input: one line on stderr, exit status 2, no traceback, and nothing written,
so that the corrected command just works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convplus.cli import main
from convplus.train import engine

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "convnextv2_atto", "--model-kwargs", json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})]
QUICK = ["--epochs", "1", "--batch-size", "32", "--max-train-samples", "64", "--max-val-samples", "32", "--quiet"]


def _error(capsys, argv: list[str], command: str, message: str) -> None:
    """``convplus argv`` fails with exit status 2 and one stderr line naming the command and ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"convplus {command}: error: ") and message in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "imagefolder:/nonexistent"], "does not exist"),
        (["--data", "mnist"], "unknown dataset form"),
        (["--model", "convnextv2_atoo"], "unknown model; did you mean convnextv2_atto"),
        (["--model-kwargs", '{"depth": [1]}'], "--model-kwargs"),
        (["--amp", "fp32"], "--amp 'fp32'"),
        (["--lr", "-1"], "--lr -1.0: expected a number > 0"),
        (["--opt", "adamz"], "adamz"),
        (["--batch-size", "100000"], "less than one batch"),
        (["--img-size", "2"], "cannot run on 1x2x2 images"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_train_refuses_bad_input_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    _error(capsys, ["train", *TINY, *QUICK, "--output", str(out), *flags], "train", message)
    assert not out.exists()


def test_bad_yaml_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\nlearning_rate: 0.1\n")
    _error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "r")], "train", "learning_rate")
    _error(capsys, ["train", "--config", str(tmp_path / "none.yaml")], "train", "no such file")
    assert not (tmp_path / "r").exists()


def test_corrected_command_just_works_and_eval_checks_its_input(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder stays empty after a failed start
    _error(capsys, ["train", *TINY, *QUICK, "--output", str(out), "--data", "imagefolder:/nonexistent"], "train", "")
    assert out.is_dir() and not list(out.iterdir())
    assert main(["train", *TINY, *QUICK, "--output", str(out)]) == 0
    _error(capsys, ["train", *TINY, *QUICK, "--output", str(out)], "train", "already holds a run")

    _error(capsys, ["eval", "--checkpoint", str(tmp_path / "nowhere")], "eval", "not a run folder or checkpoint")
    _error(capsys, ["eval", "--checkpoint", str(out), "--ema"], "eval", "no EMA weights")
    _error(capsys, ["eval", "--checkpoint", str(out), "--data", "synthetic:nope"], "eval", "unknown")
    _error(capsys, ["eval", "--checkpoint", str(out), "--batch-size", "0"], "eval", "--batch-size 0")
    assert not (out / "eval").exists()
    assert main(["eval", "--checkpoint", str(out)]) == 0


def test_failure_before_the_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *TINY, *QUICK, "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_convert_refuses_bad_input_before_writing(tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert", "--model", "convnextv2_atto", "--output", str(out), "--checkpoint"]
    _error(capsys, [*argv, str(tmp_path / "missing.pth")], "convert", "no such checkpoint file")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    _error(capsys, [*argv, str(tmp_path / "junk.pth")], "convert", "not a readable checkpoint")
    _error(capsys, ["convert", "--model", "resnet50", "--output", str(out), "--checkpoint", "x"], "convert", "resnet50")
    assert not out.exists() and not (tmp_path / ".converted").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--task", "imagenet"], "invalid choice: 'imagenet'"), (["--seeds", "0"], "expected an integer >= 1")],
)
def test_ablate_refuses_bad_arguments(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--quick", "--output", str(tmp_path / "ablation"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"convplus ablate: error: argument {flags[0]}" in err and message in err, err
    assert not (tmp_path / "ablation").exists()


def test_command_line_prints_no_traceback(tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback, no run folder."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "convplus.cli", "train", "--data", "imagefolder:/nonexistent", "--output", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("convplus train: error: --data imagefolder:/nonexistent")
    assert not out.exists()
