"""ConvPlus{1,2,3}d as layers: dtypes, torch.compile, state_dict, positional encodings, introspection."""

from __future__ import annotations

import io

import pytest
import torch

from convplus import ConvPlus2d, conv_plus

from . import oracle
from .conftest import MODULES, rel_err


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_run_and_agree_with_the_definition(n, dtype):
    module = MODULES[n](8, 6, kernel_size=3, heads=2, dtype=torch.float64)
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, *([5] * n), dtype=torch.float64)
    with torch.no_grad():
        expected = oracle.conv_plus(module, x)
    y = module.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 6, *([5] * n))
    assert rel_err(y.double(), expected) <= {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]


def test_torch_compile_matches_eager():
    """torch.compile traces a Conv+ layer (the fused C++ kernel as custom ops) and matches eager: inductor's code for
    inference, and the training graph (forward and backward through AOTAutograd) with the aot_eager backend, whose
    backward is the one inductor would compile (its code generation for that graph is PyTorch's own; compiling it
    cold here would double the test's cost)."""
    module = ConvPlus2d(8, kernel_size=3, heads=2)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    eager = module(x)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module)(x), eager, rtol=1e-5, atol=1e-5)
    y = torch.compile(module, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, {"score": "qk", "pos": "learned"}, {"proj": False, "bias": False}])
def test_state_dict_round_trip(kwargs):
    source = ConvPlus2d(8, heads=4, kernel_size=5, **kwargs)
    with torch.no_grad():
        source.gain.uniform_(-1, 1)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = ConvPlus2d(8, heads=4, kernel_size=5, **kwargs)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(source(x), target(x))


def test_learned_positions_resample_to_other_sizes():
    module = ConvPlus2d(8, kernel_size=3, heads=2, pos="learned", pos_size=(4, 5))
    assert module.pos_embed.shape == (8, 4, 5)
    assert torch.equal(module.positional_encoding(torch.zeros(1, 8, 4, 5)), module.pos_embed)
    resized = module.positional_encoding(torch.zeros(1, 8, 9, 3))
    assert resized.shape == (8, 9, 3)
    module(torch.randn(1, 8, 9, 3)).sum().backward()
    assert module.pos_embed.grad.abs().sum() > 0


def test_sincos_differs_between_positions():
    module = ConvPlus2d(16, heads=4)
    pos = module.positional_encoding(torch.zeros(1, 16, 6, 6))
    flat = pos.flatten(1).T
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0.1


def test_decompose_sums_to_forward():
    module = ConvPlus2d(8, 12, kernel_size=5, heads=4)
    x = torch.randn(2, 8, 7, 9)
    terms = module.decompose(x)
    assert terms["attention"].shape == terms["convolution"].shape == (2, 12, 7, 9)
    y = torch.einsum("oc,bchw->bohw", module.output_weight, terms["attention"] + terms["convolution"])
    assert rel_err(y + module.bias.view(1, -1, 1, 1), module(x)) <= 1e-5


def test_attention_probs_rows_are_softmax_over_the_window():
    module = ConvPlus2d(8, kernel_size=3, window=3, heads=2)
    probs = module.attention_probs(torch.randn(1, 8, 5, 6))
    assert probs.shape == (1, 2, 30, 30)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 30))
    # corner (0, 0) sees only its 2x2 in-grid neighborhood
    assert (probs[0, 0, 0] > 0).sum() == 4


@pytest.mark.parametrize(("kept", "dropped"), [("attention", "convolution"), ("convolution", "attention")])
def test_terms_can_be_switched_off(kept, dropped):
    module = ConvPlus2d(8, 6, kernel_size=3, heads=2, **{dropped: False})
    assert (module.kernel if dropped == "convolution" else module.gain) is None
    with torch.no_grad():
        module.bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 6, 6)
    terms = module.decompose(x)
    assert torch.count_nonzero(terms[dropped]) == 0
    assert terms[kept].abs().amax(dim=1).gt(1e-3).all()  # the kept term is on at every position
    y = torch.einsum("oc,bchw->bohw", module.output_weight, terms[kept]) + module.bias.view(1, -1, 1, 1)
    assert rel_err(module(x), y) <= 1e-5
    assert rel_err(module(x), oracle.conv_plus(module, x)) <= 1e-5


def test_window_larger_than_grid_is_clipped_and_equals_global():
    x = torch.randn(2, 8, 3, 4)
    local = ConvPlus2d(8, kernel_size=3, window=9, heads=2, backend="local")
    glob = ConvPlus2d(8, kernel_size=3, window=None, heads=2, backend="reference")
    glob.load_state_dict(local.state_dict())
    assert rel_err(local(x), glob(x)) <= 1e-5


def test_nan_in_nan_out():
    module = ConvPlus2d(8, heads=2, kernel_size=3)
    x = torch.randn(1, 8, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    y = module(x)
    assert torch.isnan(y).any() and not torch.isnan(y).all()


def test_functional_form_matches_module():
    module = ConvPlus2d(8, 4, kernel_size=3, heads=2, score="qk", pos="none")
    x = torch.randn(2, 8, 6, 5)
    y = conv_plus(
        x,
        heads=2,
        kernel=module.kernel,
        gain=module.gain,
        window=(3, 3),
        dilation=(1, 1),
        score="qk",
        query_weight=module.query_weight,
        query_bias=module.query_bias,
        key_weight=module.key_weight,
        key_bias=module.key_bias,
        value_weight=module.value_weight,
        value_bias=module.value_bias,
        output_weight=module.output_weight,
        bias=module.bias,
        backend="reference",
    )
    assert torch.equal(y, module(x)) or rel_err(y, module(x)) <= 1e-6


def test_fresh_initialisation_is_documented_values():
    module = ConvPlus2d(8, heads=4)
    assert torch.equal(module.gain, torch.ones(4))
    torch.testing.assert_close(module.temperature, torch.full((4,), 10.0))
    assert module.kernel.shape == (4, 2, 7, 7) and module.kernel.abs().max() <= 1 / 7
    assert torch.count_nonzero(module.bias) == 0


@pytest.mark.parametrize(("n", "layout"), [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_input_keeps_its_layout_in_output_and_gradient(n, layout):
    module = MODULES[n](8, heads=2, kernel_size=3)
    x = torch.randn(2, 8, *([5] * n), requires_grad=True)
    outputs, grads = {}, {}
    for name, fmt in (("last", layout), ("plain", torch.contiguous_format)):
        inner = (x * 1).contiguous(memory_format=fmt)  # not a leaf: the gradient reaching it is the module's
        inner.register_hook(lambda grad, name=name: grads.__setitem__(name, grad))
        outputs[name] = module(inner)
        outputs[name].backward(torch.ones_like(outputs[name]))
    assert outputs["last"].is_contiguous(memory_format=layout)
    assert grads["last"].is_contiguous(memory_format=layout)
    torch.testing.assert_close(outputs["last"], outputs["plain"])
    torch.testing.assert_close(grads["last"], grads["plain"])


@pytest.mark.parametrize("backend", ["cpu", "local"])
def test_training_after_inference_mode_on_the_same_shapes(backend):
    """Geometry and positional encodings are cached per shape; made first under torch.inference_mode(), they
    must still be usable by a later training step (inference tensors cannot be saved for backward)."""
    from convplus.backends import fused_window
    from convplus.positional import _cached_sincos

    fused_window._cached_fused_window.cache_clear()
    _cached_sincos.cache_clear()
    layer = ConvPlus2d(8, kernel_size=3, window=3, heads=2, pos="sincos", backend=backend)
    x = torch.randn(2, 8, 7, 9)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
