"""timm integration (convplus.models): exact conversion, registry, pretrained files, convert, export."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import convplus
import convplus.cli
from convplus import ConvPlus2d
from convplus.models import CheckpointError, convert, load_converted, load_pretrained, replace_convplus

from .conftest import rel_err


def _randomized(name: str, **kwargs) -> torch.nn.Module:
    """A plain timm model with random, non-trivial weights (not the near-identity init), in eval mode."""
    model = timm.create_model(name, **kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() == 1 else 1.0 / p[0].numel() ** 0.5))
    return model.eval()


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("convnextv2_atto", (2, 3, 64, 96)),
        ("convnextv2_nano", (1, 3, 96, 64)),
        ("convnextv2_tiny", (1, 3, 64, 96)),
        ("convnext_atto", (1, 3, 64, 64)),
    ],
)
def test_converted_model_computes_the_same_logits(name, shape):
    plain = _randomized(name)
    converted = replace_convplus(copy.deepcopy(plain)).eval()
    assert sum(isinstance(m, ConvPlus2d) for m in converted.modules()) == sum(len(s.blocks) for s in plain.stages)
    x = torch.randn(shape)
    with torch.no_grad():
        assert rel_err(converted(x), plain(x)) <= 1e-4


@pytest.mark.parametrize("name", ["convnextv2_base", "convnextv2_large", "convnextv2_huge"])
def test_large_models_convert_exactly_at_small_input(name):
    plain = _randomized(name, depths=(1, 1, 1, 1))  # the real widths; one block per stage (all blocks are alike)
    converted = replace_convplus(copy.deepcopy(plain), stages=[2, 3]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(converted(x), plain(x)) <= 1e-4


def test_training_step_after_conversion_changes_gains():
    model = replace_convplus(timm.create_model("convnextv2_atto", num_classes=4), stages=[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    optimizer.step()
    gains = [m.gain for m in model.modules() if isinstance(m, ConvPlus2d)]
    assert all(g.abs().sum() > 0 for g in gains)


def test_registered_models_create_like_timm():
    for size in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
        assert timm.is_model(f"convplus_convnextv2_{size}")
    model = timm.create_model("convplus_convnextv2_atto", num_classes=7, drop_path_rate=0.1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.stages[3].blocks[0].conv_dw.window is None and model.stages[0].blocks[0].conv_dw.window == (7, 7)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("convplus_convnextv2_atto", pretrained=True)


@pytest.mark.parametrize("size", [(64, 96), (96, 160)])
def test_features_only_gives_four_stage_maps(size):
    model = timm.create_model("convplus_convnextv2_atto", features_only=True).eval()
    features = model(torch.randn(1, 3, *size))
    assert [f.shape[1] for f in features] == [40, 80, 160, 320]
    assert [f.shape[2:] for f in features] == [torch.Size([size[0] // s, size[1] // s]) for s in (4, 8, 16, 32)]
    assert (
        len(
            timm.create_model("convplus_convnextv2_atto", features_only=True, out_indices=(1, 2))(
                torch.randn(1, 3, 64, 64)
            )
        )
        == 2
    )


def test_bad_models_and_stages():
    with pytest.raises(ValueError, match="supports timm ConvNeXt"):
        replace_convplus(timm.create_model("resnet10t"))
    with pytest.raises(ValueError, match=r"stages must be indices in 0\.\.3"):
        replace_convplus(timm.create_model("convnextv2_atto"), stages=[4])


def test_pretrained_file_into_convplus_model_is_exact(tmp_path):
    plain = _randomized("convnextv2_atto")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, path)
    model = load_pretrained(timm.create_model("convplus_convnextv2_atto"), path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) <= 1e-4
    torch.save({"model": plain.state_dict()}, tmp_path / "wrapped.pth")
    load_pretrained(timm.create_model("convplus_convnextv2_atto"), tmp_path / "wrapped.pth")
    with pytest.warns(UserWarning, match="classifier head"):
        load_pretrained(timm.create_model("convplus_convnextv2_atto", num_classes=3), path)
    trained = _randomized("convplus_convnextv2_atto")  # a Conv+ run's weights: its gains are kept, not zeroed
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "convplus.safetensors")
    again = load_pretrained(timm.create_model("convplus_convnextv2_atto"), tmp_path / "convplus.safetensors")
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[key], msg=key)


def test_convert_command_writes_folder_and_refuses_bad_files(tmp_path):
    plain = _randomized("convnextv2_atto", num_classes=10)
    ckpt = tmp_path / "atto.pth"
    torch.save(plain.state_dict(), ckpt)
    out = tmp_path / "converted"
    assert (
        convplus.cli.main(
            [
                "convert",
                "--model",
                "convnextv2_atto",
                "--checkpoint",
                str(ckpt),
                "--output",
                str(out),
                "--num-classes",
                "10",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "convplus_convnextv2_atto" and config["max_abs_logit_difference"] < 1e-4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(load_converted(out).eval()(x), plain(x)) <= 1e-4

    (tmp_path / "junk.pth").write_text("not a checkpoint")
    other = _randomized("convnextv2_femto")
    torch.save(other.state_dict(), tmp_path / "femto.pth")
    partial = {k: v for k, v in plain.state_dict().items() if "stages.3" not in k}
    torch.save(partial, tmp_path / "partial.pth")
    cases = [
        ("missing.pth", "no such checkpoint file"),
        ("junk.pth", "not a readable checkpoint"),
        ("femto.pth", "mismatched shapes"),
        ("partial.pth", "missing keys"),
    ]
    for name, message in cases:
        target = tmp_path / f"out_{name}"
        with pytest.raises(CheckpointError, match=message):
            convert("convnextv2_atto", tmp_path / name, target, num_classes=10)
        assert not target.exists()
        assert not list(tmp_path.glob(f".out_{name}*"))
    with pytest.raises(ValueError, match="--model must be one of"):
        convert("resnet50", ckpt, tmp_path / "x")
    with pytest.raises(ValueError, match="not empty"):
        convert("convnextv2_atto", ckpt, out, num_classes=10)


def test_torch_compile_matches_eager():
    """A one-block-per-stage, 8-32 channel Conv+ ConvNeXt V2 captured whole by torch.compile (one graph, no
    breaks) through AOT autograd ('aot_eager': forward and backward graphs, run without code generation):
    output and the gains' gradients match eager. Inductor's code generation, which a cold cache makes cost
    seconds per kernel, is checked on a single Conv+ layer in test_module.py."""
    torch.manual_seed(0)
    model = timm.create_model("convplus_convnextv2_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    gains = [stage.blocks[0].conv_dw.gain for stage in model.stages]
    x = torch.randn(1, 3, 32, 32)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), gains)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), gains)
    torch.testing.assert_close(y, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-3, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("convplus_convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)).eval()
    for m in model.modules():  # a model that uses its attention term
        if isinstance(m, ConvPlus2d):
            torch.nn.init.uniform_(m.gain, 0.5, 1.5)
    path = convplus.models.export_onnx(model, tmp_path / "atto.onnx", input_shape=(1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(logits), model(x)) <= 1e-4
