"""``convplus ablate``: the quick suite end to end, matched parameters, receptive fields, results.json, the
statistics, user data, and what ``--replace-convplus`` builds with and without trained weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy import stats as scipy_stats

from convplus import ConvPlus2d
from convplus.ablation.backbones import BACKBONES, grid_sizes, receptive_field
from convplus.ablation.report import write_report
from convplus.ablation.runner import QUICK, TASKS, config
from convplus.ablation.stats import paired, pooled_std, summarize, verdict
from convplus.ablation.variants import VARIANT_NAMES, variants
from convplus.cli import main
from convplus.models import create_segmenter, replace_convplus
from convplus.train import TrainConfig
from convplus.train.classification import ClassificationTask
from convplus.train.data import build_data
from convplus.train.engine import build_data as build_task_data
from convplus.train.engine import optimizer_groups
from convplus.train.segmentation import SegmentationTask

RECORD_KEYS = {"task": str, "variant": str, "seed": int, "top1": float, "params": int, "train_seconds": float}


def _model(backbone: str, variant) -> torch.nn.Module:
    kwargs = {"backbone": backbone, "mixer": variant.mixer, "mixer_kwargs": variant.mixer_kwargs}
    if variant.finetune_from:  # the conv model converted exactly
        return replace_convplus(timm.create_model("convplus_ablation", backbone=backbone), **variant.convert_kwargs)
    return timm.create_model("convplus_ablation", frozen_gain=variant.frozen_gain, **kwargs)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_variants_match_parameters_within_two_percent(backbone):
    params = {v.name: sum(p.numel() for p in _model(backbone, v).parameters()) for v in variants(backbone)}
    assert list(params) == list(VARIANT_NAMES)
    assert max(params.values()) / min(params.values()) <= 1.02, params


def test_receptive_fields_and_grids():
    """The conv column sees 2 + depth * (k - 1) * 2 = 18 px of 32 (its 16x16 grid's cells are 2 px); local
    windows add nothing to that; global attention and the sketch see the whole image (the converted conv too,
    once its gains move away from 0)."""
    expected = {"conv": 18, "attention-local": 18, "convplus-local": 18}
    for variant in variants("isotropic"):
        model = _model("isotropic", variant)
        assert receptive_field(model, 32, 3) == expected.get(variant.name, 32), variant.name
        assert grid_sizes(model, 32, 3) == [16]
    assert grid_sizes(timm.create_model("convplus_ablation", backbone="hierarchical"), 32, 3) == [16, 8, 4, 2]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_features_only_maps_have_the_grids_feature_info_states(backbone):
    """A segmenter places its FPN by ``feature_info``: each map's channels and stride must be the real ones
    (the hierarchical backbone's stride-2 stem halves timm's strides)."""
    features = timm.create_model("convplus_ablation", backbone=backbone, features_only=True, patch_size=2)
    maps = features(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [64 // m.shape[-1] for m in maps] == features.feature_info.reduction()
    assert features.feature_info.reduction()[0] == 2


def test_fixed_blend_freezes_only_the_gains():
    fixed = next(v for v in variants("isotropic") if v.name == "fixed-blend")
    layers = [m for m in _model("isotropic", fixed).modules() if isinstance(m, ConvPlus2d)]
    assert layers and all(not m.gain.requires_grad and m.kernel.requires_grad for m in layers)
    assert all(torch.equal(m.gain, torch.ones_like(m.gain)) for m in layers)


def test_statistics():
    values = [90.0, 92.0, 91.0, 95.0, 89.0]
    s = summarize(values)
    assert s.mean == pytest.approx(91.4) and s.std == pytest.approx(np.std(values, ddof=1))
    low, high = scipy_stats.t.interval(0.95, 4, loc=s.mean, scale=scipy_stats.sem(values))
    assert (s.mean - s.ci, s.mean + s.ci) == pytest.approx((low, high))
    a, b = {0: 80.0, 1: 82.0, 2: 81.0}, {0: 70.0, 1: 73.0, 2: 70.5, 3: 99.0}
    assert paired(a, b).mean == pytest.approx(np.mean([10.0, 9.0, 10.5]))  # seed 3 has no pair
    assert verdict(paired(a, b)).startswith("exceeds")
    assert verdict(paired(b, a)).startswith("falls short by")
    assert verdict(summarize([-1.0, 1.0, 0.5])).startswith("reaches")
    assert verdict(summarize([-3.0, 1.0, -2.0])).startswith("not shown to fall short")  # mean < 0, CI holds 0
    assert pooled_std([[1.0, 3.0], [10.0, 14.0]]) == pytest.approx(math.sqrt((2.0 + 8.0) / 2))


def _check_results(folder, tasks, names, seeds):
    records = json.loads((folder / "results.json").read_text())
    assert isinstance(records, list) and len(records) == len(tasks) * len(names) * seeds
    for record in records:
        assert all(isinstance(record[k], kind) for k, kind in RECORD_KEYS.items()), record
        assert 0 <= record["top1"] <= 100 and record["params"] > 0 and record["train_seconds"] > 0
    assert {(r["task"], r["variant"], r["seed"]) for r in records} == {
        (t, v, s) for t in tasks for v in names for s in range(seeds)
    }
    return records


def test_quick_suite_end_to_end(tmp_path):
    names = ["conv", "attention-global", "convplus-global", "conv-to-convplus", "seed-sketch"]
    argv = ["ablate", "--task", "texture", "--quick", "--seeds", "2", "--workers", "1", "--output", str(tmp_path)]
    assert main([*argv, "--variants", *names]) == 0
    _check_results(tmp_path, ["texture"], names, 2)
    history = json.loads((tmp_path / "layers.json").read_text())["texture"]
    assert set(history) == set(names) - {"conv", "seed-sketch"}  # the models with Conv+ layers
    layer = history["conv-to-convplus"][0][-1]["layers"][0]  # seed 0, last epoch, first layer
    assert layer["mean_attention_distance"] > 0 and len(layer["gains"]) == 1
    assert json.loads((tmp_path / "architectures.json").read_text())["texture"]["conv"]["receptive_field"] == 18
    report = (tmp_path / "report.md").read_text()
    assert "| task | conv | attention-global | convplus-global | conv-to-convplus | seed-sketch |" in report
    assert (tmp_path / "top1.png").is_file() and (tmp_path / "blend_texture.png").is_file()
    for name in ("top1.png", "report.md"):
        (tmp_path / name).unlink()
    assert main(["ablate", "--report", str(tmp_path)]) == 0  # from the files alone
    assert (tmp_path / "report.md").read_text() == report and (tmp_path / "top1.png").is_file()
    # run again: every finished run of the same settings is reused (not retrained), and the records are
    # the same; a changed setting (here 3 seeds) trains only the new runs
    summaries = sorted(tmp_path.glob("texture/*/seed*/summary.json"))
    written = [f.stat().st_mtime_ns for f in summaries]
    records = json.loads((tmp_path / "results.json").read_text())
    three_seeds = [a if a != "2" else "3" for a in argv]  # --seeds 3
    assert main([*three_seeds, "--variants", "conv", "attention-global"]) == 0
    assert [f.stat().st_mtime_ns for f in summaries] == written
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r for r in again if r["seed"] < 2] == [r for r in records if r["variant"] in ("conv", "attention-global")]
    assert sorted(r["variant"] for r in again if r["seed"] == 2) == ["attention-global", "conv"]


def test_quick_segmentation_task_scores_miou_and_converts_the_whole_conv_segmenter(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVPLUS_CACHE", str(tmp_path / "cache"))
    names = ["conv", "conv-to-convplus"]
    argv = ["ablate", "--task", "shapes", "--quick", "--seeds", "1", "--workers", "1", "--output", str(tmp_path)]
    assert main([*argv, "--variants", *names]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["metric"]) for r in records] == [(n, "miou") for n in names]
    summary = json.loads((tmp_path / "shapes" / "conv" / "seed0" / "summary.json").read_text())
    assert records[0]["miou"] == pytest.approx(100 * summary["final_miou"]) and 0 <= records[0]["miou"] <= 100
    report = (tmp_path / "report.md").read_text()
    assert "| shapes: variant | mIoU mean ± std |" in report
    architectures = json.loads((tmp_path / "architectures.json").read_text())["shapes"]
    assert architectures["conv"]["grids"] == [16]  # 64x64 images in 4x4 patches
    # conv-to-convplus: the trained conv segmenter, every weight (FPN and head too), converted exactly
    converted_variant = next(v for v in variants("isotropic") if v.name == "conv-to-convplus")
    cfg = config("shapes", converted_variant, 0, QUICK, tmp_path)
    converted = SegmentationTask(cfg, build_task_data(cfg), torch.device("cpu")).build_model().eval()
    shapes = TASKS["shapes"]
    plain = create_segmenter("convplus_ablation", 6, backbone="isotropic", **shapes.model_kwargs, **shapes.head_kwargs)
    plain.eval()
    plain.load_state_dict(load_file(cfg.pretrained_file))
    assert any(isinstance(m, ConvPlus2d) for m in converted.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-5)


def test_report_reads_the_conversion_study_from_results_json(tmp_path):
    """results.json holds every per-seed number: the suite's records and the conversion study's (with a
    ``setting``); the study's go to its own table, never into the suite's."""
    common = {"task": "xor", "params": 100, "train_seconds": 1.0, "backbone": "isotropic", "metric": "top1"}
    records = [
        {**common, "variant": variant, "seed": seed, "top1": top1 + seed}
        for variant, top1 in (("conv", 50.0), ("convplus-global", 90.0))
        for seed in range(2)
    ]
    study = [
        {
            **common,
            "variant": "conv-to-convplus",
            "setting": setting,
            "seed": seed,
            "top1": top1 + 2 * seed,
            "attention_share": 0.5,
            "mean_abs_gain": 0.25,
        }
        for setting, top1 in (("g=0, lr x1, tau=10", 10.0), ("g=0, lr x10, tau=1 (default)", 70.0))
        for seed in range(2)
    ]
    (tmp_path / "results.json").write_text(json.dumps(records + study))
    (tmp_path / "architectures.json").write_text(json.dumps({}))
    report = write_report(tmp_path, tmp_path / "report.md", "convplus ablate").read_text()
    assert "| task | conv | convplus-global | verdict" in report  # the suite's table: its two variants only
    assert "| xor | 50.50 ± 6.35 | **90.50 ± 6.35** |" in report
    assert "| g=0, lr x1, tau=10 | 11.00 ± 12.71 | 50.0% | 0.250 | 2 |" in report
    assert "| g=0, lr x10, tau=1 (default) | 71.00 ± 12.71 | 50.0% | 0.250 | 2 |" in report


def test_user_image_folder(tmp_path):
    """--data imagefolder:PATH on a folder in the ImageNet layout (train/<class>/*, val/<class>/*)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    data = f"imagefolder:{tmp_path / 'data'}"
    argv = ["ablate", "--data", data, "--quick", "--seeds", "1", "--workers", "1", "--output", str(tmp_path / "runs")]
    assert main([*argv, "--variants", "conv", "convplus-local"]) == 0
    _check_results(tmp_path / "runs", [data], ["conv", "convplus-local"], 1)
    assert (tmp_path / "runs" / "report.md").is_file()
    assert main(["ablate", "--data", "coco:/nowhere", "--quick"]) == 2


def _converted(tmp_path, pretrained_file=None):
    cfg = TrainConfig(
        model="convnextv2_atto",
        model_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16]},
        replace_convplus=True,
        pretrained_file=pretrained_file,
        max_train_samples=8,
        max_val_samples=8,
    )
    data = build_data(cfg.data, cfg.img_size, max_train=8, max_val=8)
    return ClassificationTask(cfg, data, torch.device("cpu")).build_model().eval(), data


def test_replace_convplus_is_fresh_without_weights_and_exact_with_them(tmp_path):
    fresh, data = _converted(tmp_path)
    layers = [m for m in fresh.modules() if isinstance(m, ConvPlus2d)]
    assert layers and all(torch.equal(m.gain, torch.ones_like(m.gain)) for m in layers)  # both terms on

    plain = timm.create_model("convnextv2_atto", num_classes=10, in_chans=1, depths=[1, 1, 1, 1], dims=[8, 16, 16, 16])
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    converted, _ = _converted(tmp_path, str(tmp_path / "plain.pth"))
    layers = [m for m in converted.modules() if isinstance(m, ConvPlus2d)]
    assert all(torch.equal(m.gain, torch.zeros_like(m.gain)) for m in layers)
    assert all(torch.allclose(m.temperature, torch.ones(1)) for m in layers)  # the study's default, tau = 1
    x = torch.stack([data.val[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(converted(x), plain.eval()(x), atol=1e-5)


def test_gains_and_temperatures_get_their_own_learning_rate():
    assert TrainConfig(replace_convplus=True, pretrained_file="weights.pth").blend_lr_scale() == 10.0
    assert TrainConfig(replace_convplus=True).blend_lr_scale() == TrainConfig().blend_lr_scale() == 1.0
    assert TrainConfig(convplus_lr_scale=3.0).blend_lr_scale() == 3.0
    model = timm.create_model("convplus_ablation", mixer="convplus", mixer_kwargs={"heads": 1})
    groups = optimizer_groups(model, 0.05, 10.0)
    blend = {id(m.gain) for m in model.modules() if isinstance(m, ConvPlus2d)}
    blend |= {id(m.log_temperature) for m in model.modules() if isinstance(m, ConvPlus2d)}
    for group in groups:
        in_blend = {id(p) in blend for p in group["params"]}
        assert len(in_blend) == 1 and group["lr_scale"] == (10.0 if in_blend.pop() else 1.0)
        assert group["weight_decay"] == (0.05 if all(p.ndim > 1 for p in group["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
