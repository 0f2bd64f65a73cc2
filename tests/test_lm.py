"""Byte-level language models: causality of every mixer, matched sizes, learning, the text data, and the
``train --task lm`` / ``sample`` commands."""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from convplus.cli import main as cli_main
from convplus.data.text import ByteSequences, stdlib_root, text_files, text_splits
from convplus.models.language import ByteLM, layer_plan
from convplus.models.token_mixers import MIXERS
from convplus.train import TrainConfig, load_run, train
from tests.test_train import assert_resume_equals_uninterrupted

MIXER_NAMES = tuple(MIXERS)
TINY = {"dim": 32, "depth": 3, "heads": 2, "plan": layer_plan(3, window=5)}
TINY_JSON = json.dumps({"dim": 32, "depth": 2, "heads": 2})


def tiny_lm(mixer: str) -> ByteLM:
    return ByteLM(mixer, **TINY)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@torch.no_grad()
def test_logits_at_t_never_depend_on_later_bytes(mixer):
    model = tiny_lm(mixer).eval()
    tokens = torch.randint(0, 256, (2, 40))
    logits = model(tokens)
    for t in (0, 7, 20, 38):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 256, changed[:, t + 1 :].shape)
        after = model(changed)
        torch.testing.assert_close(after[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(after[:, t + 1 :], logits[:, t + 1 :])  # later positions do see it


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_mixers_have_matched_parameter_counts(size):
    counts = {m: sum(p.numel() for p in timm.create_model(f"{m}_lm_{size}").parameters()) for m in MIXER_NAMES}
    reference = counts["transformer"]
    assert all(abs(count - reference) <= 0.02 * reference for count in counts.values()), counts
    assert all(count != reference for mixer, count in counts.items() if mixer != "transformer"), counts


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_one_step_lowers_the_loss_and_trains_every_parameter(mixer):
    model = tiny_lm(mixer)
    tokens = torch.randint(0, 256, (4, 33))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = loss()
    before.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    optimizer.step()
    assert loss().item() < before.item() - 0.01


def test_byte_sequences_are_shifted_windows():
    data = bytes(range(100))
    sequences = ByteSequences(data, 16)
    assert len(sequences) == 6  # (100 - 1) // 16
    x, y = sequences[2]
    assert x.tolist() == list(range(32, 48)) and y.tolist() == list(range(33, 49))
    with pytest.raises(IndexError):
        sequences[6]


def test_folder_split_by_file_is_deterministic_and_disjoint(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i:02d}\n" * 5)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match="1 file"):
        train_bytes, val_bytes = text_splits(f"text:{tmp_path}")
    in_val = {i for i in range(40) if f"file {i:02d}".encode() in val_bytes}
    in_train = {i for i in range(40) if f"file {i:02d}".encode() in train_bytes}
    assert in_val and in_train and not in_val & in_train and in_val | in_train == set(range(40))
    assert in_val == {i for i in range(40) if zlib.crc32(f"f{i:02d}.txt".encode()) % 10 == 0}


def test_single_file_splits_by_position_and_bad_forms_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 90 + "y" * 10)
    assert text_splits(f"text:{tmp_path / 'a.txt'}") == (b"x" * 90, b"y" * 10)
    for form, message in (("txt:a", "not a text corpus"), (f"text:{tmp_path / 'no'}", "does not exist")):
        with pytest.raises(ValueError, match=message):
            text_splits(form)


def test_stdlib_corpus_is_python_source_without_site_packages():
    files = text_files(stdlib_root(), "*.py")
    assert len(files) > 100 and any(f.name == "argparse.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def write_corpus(path: Path) -> Path:
    """A small, learnable text file: repeated lines of Python."""
    lines = [f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n" for i in range(200)]
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("lm")
    cfg = TrainConfig(
        task="lm",
        model="convplus_lm_tiny",
        model_kwargs=json.loads(TINY_JSON),
        data=f"text:{write_corpus(tmp / 'corpus.txt')}",
        seq_len=32,
        max_train_samples=64,
        epochs=3,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0,
        output=str(tmp / "run"),
        quiet=True,
    )
    return tmp / "run", train(cfg)


def test_train_lm_writes_the_run_folder_with_bits_per_byte(lm_run):
    run, summary = lm_run
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curves.png", "sample.txt", "best/state.pt"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bpb = [float(r["val_bpb"]) for r in rows]
    assert len(rows) == 3 and bpb[-1] < bpb[0] < 8.0
    assert summary["best_epoch"] == 1 + bpb.index(min(bpb))  # lower bits per byte is better
    assert summary["best_bpb"] == min(bpb) and summary["final_bpb"] == bpb[-1]
    assert math.isclose(float(rows[-1]["val_loss"]) / math.log(2), bpb[-1], rel_tol=1e-9)


def test_sample_prints_the_prompt_and_a_continuation(lm_run, capsys):
    run, _ = lm_run
    argv = ["sample", "--checkpoint", str(run), "--prompt", "def f", "--tokens", "24", "--temperature", "0"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    expected = load_run(run).model.generate(b"def f", 24, temperature=0, context=32)
    assert len(expected) == 24
    assert printed == "def f" + expected.decode("utf-8", errors="replace") + "\n"


def test_sample_refuses_bad_settings(lm_run, capsys):
    run, _ = lm_run
    assert cli_main(["sample", "--checkpoint", str(run), "--top-k", "300"]) == 2
    assert "top_k=300" in capsys.readouterr().err


def test_lm_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    flags = {
        "task": "lm",
        "model": "conv_lm_tiny",
        "model_kwargs": TINY_JSON,
        "data": f"text:{write_corpus(tmp_path / 'corpus.txt')}",
        "seq_len": "32",
        "batch_size": "4",
        "max_train_samples": "64",
    }
    assert_resume_equals_uninterrupted(tmp_path, flags, epochs=3)
