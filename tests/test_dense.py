"""Detection and segmentation: models on timm backbones, COCO / ADE20K loaders on files in the official
layouts, COCO AP and mIoU, bad input, and the trainer end to end on synthetic:shapes."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load_file, save_file

from convplus import backends
from convplus.cli import main as cli_main
from convplus.data.ade20k import IGNORE, load_ade20k
from convplus.data.coco import load_coco
from convplus.data.shapes import write_shapes
from convplus.models import CheckpointError, create_detector, create_segmenter
from convplus.modules import ConvPlus2d
from convplus.train import TrainConfig, train
from convplus.train.metrics import coco_ap, coco_results, confusion_matrix, segmentation_scores

from .test_train import ROOT, _env, kill_mid_run

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "fpn_channels": 16}
SMALL_DETECTOR = {"min_size": 96, "max_size": 160, "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32}
FEW_DETECTIONS = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 10}


def tiny_detector(masks: bool = False, backbone: str = "convplus_convnextv2_atto", **kwargs):
    return create_detector(backbone, 3, masks=masks, **{**TINY, **SMALL_DETECTOR, **kwargs})


def _targets(sizes: list[tuple[int, int]]) -> list[dict]:
    targets = []
    for i, (h, w) in enumerate(sizes):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:40, 8:50] = 1
        masks[1, 30:70, 30:60] = 1
        boxes = torch.tensor([[8.0, 10, 50, 40], [30, 30, 60, 70]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2 + i]), "masks": masks})
    return targets


def test_detector_and_segmenter_formats_on_images_of_different_sizes():
    images = [torch.rand(3, 80, 120), torch.rand(3, 100, 72)]
    detector = tiny_detector(masks=True).eval()
    with torch.no_grad():
        outputs = detector(images)
    for image, output in zip(images, outputs, strict=True):
        n = len(output["boxes"])
        assert output["boxes"].shape == (n, 4) and output["labels"].shape == output["scores"].shape == (n,)
        assert output["masks"].shape == (n, 1, *image.shape[1:])
        assert ((output["labels"] >= 1) & (output["labels"] <= 3)).all()
    losses = detector.train()(images, _targets([(80, 120), (100, 72)]))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    cell_anchors = tiny_detector(anchor_sizes=(4, 8, 16, 32, 64)).rpn.anchor_generator.cell_anchors
    assert [anchors[1, 2].item() for anchors in cell_anchors] == [2, 4, 8, 16, 32]  # aspect ratio 1: half the side
    with pytest.raises(ValueError, match="anchor_sizes needs one size per FPN level"):
        tiny_detector(anchor_sizes=(8, 16))
    segmenter = create_segmenter("convnextv2_atto", 5, **TINY, head_channels=16)
    for shape in ((1, 3, 67, 93), (2, 3, 64, 64)):
        assert segmenter(torch.rand(shape)).shape == (shape[0], 5, *shape[2:])


def _loss_after_steps(model, loss_fn, steps: int = 2) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)  # the same proposal / RoI sampling every time: the same objective
        loss = loss_fn(model)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1]


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    images, targets = [torch.rand(3, 96, 96), torch.rand(3, 96, 128)], _targets([(96, 96), (96, 128)])
    before, after = _loss_after_steps(tiny_detector().train(), lambda m: sum(m(images, targets).values()))
    assert after < before
    segmenter = create_segmenter("convplus_convnextv2_atto", 4, **TINY, head_channels=16)
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    before, after = _loss_after_steps(segmenter, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    assert after < before


def test_windowed_stages_form_no_n_by_n_attention_at_1024(monkeypatch):
    """At 1024x1024 the Conv+ layers of stages 0-2 (grids 256^2, 128^2, 64^2) run windowed backends;
    only stage 3 (32^2) may run global attention."""
    resolve, chosen = backends.resolve, []

    def recording(name, spatial, device, hood):
        fn = resolve(name, spatial, device, hood)
        chosen.append((spatial, next(k for k, v in backends.BACKENDS.items() if v is fn)))
        return fn

    monkeypatch.setattr(backends, "resolve", recording)
    detector = tiny_detector(min_size=1024, max_size=1024, rpn_post_nms_top_n_test=50).eval()
    with torch.no_grad():
        detector([torch.rand(3, 1024, 1024)])
    layers = {
        stage: [m for m in detector.backbone.body.body.modules() if isinstance(m, ConvPlus2d)]
        for stage in ("stages_0", "stages_1", "stages_2", "stages_3")
    }
    assert all(layers.values())
    grids = {(256, 256): "windowed", (128, 128): "windowed", (64, 64): "windowed", (32, 32): "global"}
    assert {spatial for spatial, _ in chosen} == set(grids)
    for spatial, backend in chosen:
        if grids[spatial] == "windowed":
            assert backend not in ("global", "reference"), (spatial, backend)


def test_backbone_weights_from_a_convnext_checkpoint_and_clear_missing_key_error(tmp_path):
    import timm

    plain = timm.create_model("convnextv2_atto", depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=7)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.2)
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    save_file(state, tmp_path / "convnext.safetensors")
    dims = {k: v for k, v in TINY.items() if k != "fpn_channels"}
    reference = timm.create_model("convnextv2_atto", features_only=True, **dims).eval()
    reference.load_state_dict(
        {
            k.replace("stem.", "stem_").replace("stages.", "stages_"): v
            for k, v in state.items()
            if not k.startswith("head.")
        }
    )
    converted = create_segmenter("convplus_convnextv2_atto", 3, tmp_path / "convnext.safetensors", **TINY).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(reference(x), converted.backbone.body(x).values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    trained = timm.create_model("convplus_convnextv2_atto", num_classes=7, **dims)  # a Conv+ run's weights
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, 0.2)
    (tmp_path / "run" / "best").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "run/best/model.safetensors")
    loaded = create_segmenter("convplus_convnextv2_atto", 3, tmp_path / "run", **TINY).backbone.body.body
    for key, value in loaded.state_dict().items():  # trained gains and temperatures kept, not reset
        name = key.replace("stem_", "stem.").replace("stages_", "stages.")
        torch.testing.assert_close(value, trained.state_dict()[name], msg=key)
    del state["stages.2.blocks.0.mlp.fc1.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken.safetensors.*missing backbone keys.*stages_2.blocks.0.mlp.fc1"):
        create_detector("convnextv2_atto", 3, pretrained_file=tmp_path / "broken.safetensors", **TINY)


def _write_coco(root: Path, category_ids=(1, 5, 90), *, bad_box=False, missing_image=False, corrupt=False) -> None:
    """Two tiny splits in the COCO 2017 layout: gapped category ids, one image without annotations."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations = [], []
        for image_id in (3, 7, 11):
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
            if image_id == 11:
                continue  # a negative image
            for k, category in enumerate(category_ids[:2] if image_id == 3 else category_ids[2:]):
                mask = np.zeros((48, 64), dtype=np.uint8)
                mask[5 + 10 * k : 25 + 10 * k, 4 + 20 * k : 30 + 20 * k] = 1
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [4 + 20 * k, 5 + 10 * k, 26, 20],
                        "area": int(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()},
                    }
                )
        if bad_box and split == "train":
            annotations[0]["bbox"] = [30, 5, -4, 20]
        document = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": f"class{c}"} for c in category_ids],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
    if missing_image:
        (root / "val2017" / f"{7:012d}.jpg").unlink()
    if corrupt:
        (root / "train2017" / f"{7:012d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def _write_ade(root: Path, largest: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg"
            )
            label = rng.integers(0, largest + 1, (40, 56)).astype(np.uint8)
            label[0, 0] = largest
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


def test_coco_loader_maps_gapped_categories_and_keeps_negatives(tmp_path):
    _write_coco(tmp_path / "coco")
    data = load_coco(tmp_path / "coco", masks=True)
    assert data.num_classes == 3 and data.category_ids == [1, 5, 90]
    targets = {t["image_id"]: t for _, t in (data.val[i] for i in range(len(data.val)))}
    assert targets[3]["labels"].tolist() == [1, 2] and targets[7]["labels"].tolist() == [3]
    assert targets[11]["boxes"].shape == (0, 4) and targets[11]["masks"].shape == (0, 48, 64)
    box, mask = targets[3]["boxes"][1], targets[3]["masks"][1]
    ys, xs = mask.nonzero(as_tuple=True)
    assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_ade_loader_reads_classes_from_label_maps_and_ignores_zero(tmp_path):
    _write_ade(tmp_path / "ade", largest=4)
    data = load_ade20k(tmp_path / "ade", img_size=32)
    assert data.num_classes == 4
    image, target = data.val[0]
    assert image.shape[1] == 32 and image.shape[2] == 44  # shorter side 32, aspect kept (56 * 32 / 40, truncated)
    raw = torch.from_numpy(np.asarray(Image.open(data.val.pairs[0][1])).astype(np.int64))
    resized = torch.nn.functional.interpolate(raw[None, None].float(), size=(32, 44), mode="nearest")[0, 0].long()
    torch.testing.assert_close(target, torch.where(resized == 0, IGNORE, resized - 1))
    (tmp_path / "ADEChallengeData2016").symlink_to(tmp_path / "ade")
    assert load_ade20k(tmp_path / "ADEChallengeData2016", img_size=32).num_classes == 150


def test_coco_ap_is_one_for_the_ground_truth_and_less_for_shifted_boxes(tmp_path):
    _write_coco(tmp_path / "coco")
    data = load_coco(tmp_path / "coco", masks=True)
    samples = [data.val[i][1] for i in range(len(data.val))]

    def ap(shift: float) -> dict[str, float]:
        results = []
        for t in samples:
            output = {
                "boxes": t["boxes"] + shift,
                "labels": t["labels"],
                "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float().roll(int(shift), -1),
            }
            results += coco_results(output, t["image_id"], data.category_ids)
        return coco_ap(data.val_coco, results, [t["image_id"] for t in samples], masks=True)

    exact, shifted = ap(0.0), ap(6.0)
    assert exact["box_ap"] == pytest.approx(1.0) and exact["mask_ap"] == pytest.approx(1.0)
    assert exact["box_ap50"] == pytest.approx(1.0)
    assert shifted["box_ap"] < 0.9 and shifted["mask_ap"] < 0.9


def test_miou_equals_the_hand_computed_value():
    target = torch.tensor([0, 0, 1, 1, 2, IGNORE])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(pred, target, 4)  # class 3 never occurs: left out of the mean
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(matrix)
    # IoU: class 0: 1 / (2 + 2 - 1), class 1: 2 / (2 + 3 - 2), class 2: 0 / (1 + 0 - 0)
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)
    assert np.isnan(scores["iou"][3])


def dense_config(tmp_path: Path, task: str, data: str, **overrides) -> TrainConfig:
    base = TrainConfig(
        task=task,
        model="convnextv2_atto",
        model_kwargs=dict(TINY),
        data=data,
        img_size=64,
        epochs=1,
        batch_size=2,
        output=str(tmp_path / "run"),
        quiet=True,
        warmup_epochs=0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
    ("task", "writer", "match"),
    [
        (
            "detection",
            lambda r: (r / "annotations").mkdir(parents=True),
            r"instances_train2017.json: missing annotation",
        ),
        ("detection", lambda r: _write_coco(r, missing_image=True), r"lists image .*val2017/000000000007.jpg"),
        ("detection", lambda r: _write_coco(r, bad_box=True), r"instances_train2017.json: .* malformed box"),
        ("segmentation", lambda r: _write_ade(r, largest=9), r"\.png: label 9 outside \[0, 4\]"),
    ],
)
def test_bad_dense_input_is_named_and_leaves_no_run_folder(tmp_path, task, writer, match):
    writer(tmp_path / "data")
    form = ("coco:" if task == "detection" else "ade20k:") + str(tmp_path / "data")
    with pytest.raises(ValueError, match=match):
        train(dense_config(tmp_path, task, form, num_classes=4 if task == "segmentation" else None))
    assert not (tmp_path / "run").exists()


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    _write_coco(tmp_path / "coco", corrupt=True)
    with pytest.warns(UserWarning, match="skipping 1 corrupt image"):
        data = load_coco(tmp_path / "coco", masks=False)
    assert data.corrupt_images == 1 and len(data.train) == 2
    _write_ade(tmp_path / "ade")
    (tmp_path / "ade/images/training/ADE_training_00000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "ade/annotations/validation/ADE_validation_00000002.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping 1 corrupt image"):
        data = load_ade20k(tmp_path / "ade", img_size=32)
    assert data.corrupt_images == 2 and len(data.train) == len(data.val) == 2


def test_shapes_are_deterministic_per_seed(tmp_path):
    sizes = {"train": 3, "val": 2}
    a, b, c = (write_shapes(tmp_path / name, seed, sizes, 64) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * (3 + 2) + 2 + 3 + 2  # jpgs in both layouts, 2 json, 5 pngs
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "coco/annotations/instances_train2017.json").read_bytes() != (
        c / "coco/annotations/instances_train2017.json"
    ).read_bytes()


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVPLUS_CACHE", str(cache))
        yield cache


@pytest.mark.parametrize("task", ["segmentation"])  # detection: in the resume test below
def test_train_and_eval_end_to_end_on_shapes(tmp_path, shapes_cache, task):
    run = tmp_path / "run"
    args = [
        "train",
        "--task",
        task,
        "--data",
        "synthetic:shapes",
        "--model",
        "convplus_convnextv2_atto",
        "--model-kwargs",
        json.dumps({**TINY, **(FEW_DETECTIONS if task == "detection" else {})}),
        "--img-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-train-samples",
        "8",
        "--max-val-samples",
        "4",
        "--warmup-epochs",
        "0",
        "--quiet",
        "--output",
        str(run),
        *(["--masks"] if task == "detection" else []),
    ]
    assert cli_main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    keys = ("box_ap", "box_ap50", "mask_ap") if task == "detection" else ("miou", "pixel_acc")
    assert all(0.0 <= summary[k] <= 1.0 for k in keys)
    for name in (
        "metrics.csv",
        "predictions.png",
        "learning_curves.png",
        "convplus_layers.png",
        "last/model.safetensors",
        "best/model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert cli_main(["eval", "--checkpoint", str(run), "--batch-size", "4", "--max-val-samples", "4"]) == 0
    assert all(k in json.loads((run / "eval" / "eval.json").read_text()) for k in keys)


def test_detection_sigkill_then_resume_equals_uninterrupted_run(tmp_path, shapes_cache):
    env = {**_env(), "CONVPLUS_CACHE": str(shapes_cache)}
    full, killed = tmp_path / "full", tmp_path / "killed"

    def command(output: Path) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "train.py"),
            "--task",
            "detection",
            "--data",
            "synthetic:shapes",
            "--model",
            "convplus_convnextv2_atto",
            "--model-kwargs",
            json.dumps({**TINY, **FEW_DETECTIONS}),
            "--img-size",
            "64",
            "--batch-size",
            "4",
            "--max-train-samples",
            "8",
            "--max-val-samples",
            "2",
            "--epochs",
            "3",
            "--warmup-epochs",
            "0",
            "--seed",
            "3",
            "--deterministic",
            "--quiet",
            "--masks",
            "--output",
            str(output),
        ]

    metrics = killed / "metrics.csv"
    done = kill_mid_run(subprocess.Popen(command(killed), env=env), metrics, timeout=300)
    assert 1 <= done < 3, "the kill should land mid-run"
    subprocess.run([*command(killed), "--resume"], check=True, env=env)
    subprocess.run(command(full), check=True, env=env)
    a, b = load_file(full / "last" / "model.safetensors"), load_file(killed / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    rows = [list(csv.DictReader(m.read_text().splitlines())) for m in (metrics, full / "metrics.csv")]
    for key in ("train_loss", "val_box_ap", "val_mask_ap"):
        assert [float(r[key]) for r in rows[0]] == pytest.approx([float(r[key]) for r in rows[1]], rel=1e-5), key
    assert len(metrics.read_text().splitlines()) == 4
    summary = json.loads((full / "summary.json").read_text())
    assert all(0.0 <= summary[k] <= 1.0 for k in ("box_ap", "box_ap50", "mask_ap"))
    for name in ("predictions.png", "learning_curves.png", "convplus_layers.png", "best/model.safetensors"):
        assert (full / name).is_file(), name
    assert cli_main(["eval", "--checkpoint", str(full), "--batch-size", "2", "--max-val-samples", "2"]) == 0
    assert json.loads((full / "eval" / "eval.json").read_text())["box_ap"] == pytest.approx(summary["box_ap"])


def test_segmentation_torchrun_two_processes_match_one_process(tmp_path, shapes_cache):
    """Each sample is augmented from its own seed, so 2 ranks x 2 images train on what 1 process x 4 does."""
    env = {**_env(), "CONVPLUS_CACHE": str(shapes_cache)}
    args = ["--task", "segmentation", "--data", "synthetic:shapes", "--model", "convplus_convnextv2_atto",
            "--model-kwargs", json.dumps(TINY), "--img-size", "64", "--batch-size", "4", "--max-train-samples",
            "8", "--max-val-samples", "6", "--epochs", "2", "--warmup-epochs", "0", "--seed", "5",
            "--deterministic", "--quiet"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--output", str(one)], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29733"]
    subprocess.run([*torchrun, str(ROOT / "train.py"), *args, "--output", str(two)], check=True, env=env)
    a, b = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    single, double = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert double["world_size"] == 2
    assert double["miou"] == pytest.approx(single["miou"], abs=1e-4)
