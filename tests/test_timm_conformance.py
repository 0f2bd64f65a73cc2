"""The Conv+ ConvNeXt V2 models through timm's model APIs, as timm's own model tests exercise them: forward,
backward, features_only, forward_intermediates, FX tracing (timm's and torchvision's feature extraction),
TorchScript, pretrained configs. Each result must equal the eager model's."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.data import resolve_data_config, resolve_model_data_config
from timm.models import get_graph_node_names, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

from convplus import ConvPlus2d
from convplus.models.registry import SIZES

NAME = "convplus_convnextv2_atto"
SHAPE = (2, 3, 64, 64)  # stage grids 16, 8, 4, 2: local windows (not covering the grid) and global attention
TIMM_LEAVES = {"leaf_modules": get_notrace_modules()}  # what timm's FX helpers trace with
scripting = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _model(**kwargs) -> torch.nn.Module:
    """The atto model, seeded: two calls with the same kwargs give the same weights."""
    torch.manual_seed(0)
    return timm.create_model(NAME, **kwargs)


def _timm_fx(model: torch.nn.Module) -> torch.nn.Module:
    """FX graph of ``model`` returning its last node, traced as timm's tests do (timm's leaf modules)."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    last = (train_nodes if model.training else eval_nodes)[-1]
    return timm.models.create_feature_extractor(model, {last: "out"})


def _grads(model: torch.nn.Module, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward(x).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(SHAPE)


def test_model_has_conv_plus_layers_with_both_terms(model):
    layers = [m for m in model.modules() if isinstance(m, ConvPlus2d)]
    assert len(layers) == 12 and all(m.gain is not None and m.kernel is not None for m in layers)


def test_backward_reaches_every_parameter(x):
    model = _model(num_classes=5).train()
    grads = _grads(model, x, model)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("feature_cls", ["list", "hook", "fx", "getter"])
def test_features_only_equals_forward_intermediates(feature_cls, x):
    full = _model().eval()
    features = _model(features_only=True, out_indices=(1, 3), feature_cls=feature_cls).eval()
    assert sum(isinstance(m, ConvPlus2d) for m in features.modules()) == 12
    assert features.feature_info.channels() == [80, 320]
    assert features.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        maps = features(x)
    assert len(maps) == 2
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_intermediates_matches_forward(model, x):
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)
    assert [tuple(t.shape[1:]) for t in intermediates] == [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]


def test_fx_forward_equals_eager(model, x):
    fx = _timm_fx(model)
    targets = {n.target for n in fx.graph.nodes if n.op == "call_module"}
    assert "stages.0.blocks.0.conv_dw" in targets  # a leaf: one graph node per Conv+ layer
    with torch.inference_mode():
        assert torch.equal(fx(x)["out"], model(x))


def test_fx_backward_equals_eager(x):
    model = _model(num_classes=5).train()
    fx = _timm_fx(model)  # shares the model's parameters
    eager = _grads(model, x, model)
    traced = _grads(fx, x, lambda t: fx(t)["out"])
    assert traced.keys() == eager.keys() == {n for n, _ in model.named_parameters()}
    for name in eager:
        torch.testing.assert_close(traced[name], eager[name], rtol=1e-5, atol=1e-6)


def test_torchvision_feature_extractor_with_timm_leaves(model, x):
    extractor = create_feature_extractor(model, ["stages.1", "stages.3"], tracer_kwargs=TIMM_LEAVES)
    with torch.no_grad():
        maps = extractor(x)
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    torch.testing.assert_close(list(maps.values()), expected, rtol=0, atol=0)


def test_tracing_through_conv_plus_names_the_fix(model):
    with pytest.raises(TypeError, match="leaf modules"):
        create_feature_extractor(model, ["stages.1"])


@scripting
def test_torchscript_forward_and_backward_equal_eager(x):
    model = _model(num_classes=5).train()
    scripted = torch.jit.script(copy.deepcopy(model))
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    eager, traced = _grads(model, x, model), _grads(scripted, x, scripted)
    assert eager.keys() == traced.keys()
    for name in eager:
        torch.testing.assert_close(traced[name], eager[name], rtol=1e-5, atol=1e-6)


@scripting
def test_torchscript_of_the_fx_graph_equals_eager(model, x):
    scripted = torch.jit.script(_timm_fx(model))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x)["out"], model(x), rtol=1e-5, atol=1e-6)


@scripting
def test_torchscript_save_is_refused_with_the_reason(model, tmp_path):
    with pytest.raises(RuntimeError, match="Could not export Python function call '_conv_plus'"):
        torch.jit.script(model).save(str(tmp_path / "model.pt"))


def test_pretrained_cfg_is_the_plain_models_preprocessing(model):
    plain = timm.create_model("convnextv2_atto")
    assert model.pretrained_cfg["architecture"] == NAME
    assert resolve_data_config({}, model=model) == resolve_data_config({}, model=plain)
    assert resolve_model_data_config(model) == resolve_model_data_config(plain)
    state = model.state_dict()
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state
    assert f"{model.pretrained_cfg['classifier']}.weight" in state
    features = _model(features_only=True)
    assert features.pretrained_cfg["architecture"] == NAME


@pytest.mark.parametrize("size", SIZES)
def test_every_size_has_a_config_without_weights(size):
    name = f"convplus_convnextv2_{size}"
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.architecture == name and not cfg.has_weights
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
    assert timm.list_models(name, name_matches_cfg=True) == [name]
    assert timm.list_pretrained(name) == []
