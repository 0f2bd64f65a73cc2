"""Bad input: a clear ValueError/TypeError naming the argument, before any compute (docs/definition.md, 'Errors')."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d, conv_plus


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel_size": 4}, ValueError, "kernel_size must be odd"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be odd"),
        ({"kernel_size": (3, 3, 3)}, ValueError, "kernel_size must be an int or a sequence of 2"),
        ({"window": 2}, ValueError, "window must be odd"),
        ({"heads": 3}, ValueError, r"heads \(3\) must divide out_channels \(8\)"),
        ({"heads": 3, "head_dim": 2, "score": "direct"}, ValueError, "score='direct' needs heads"),
        ({"heads": 0}, ValueError, "heads must be a positive int"),
        ({"dilation": 0}, ValueError, "dilation must be positive"),
        ({"score": "cosine"}, ValueError, "score must be one of 'direct', 'qk', got 'cosine'"),
        ({"pos": "rope"}, ValueError, "pos must be one of"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"proj": False, "out_channels": 4}, ValueError, "proj=False needs heads"),
        ({"in_channels": 0}, ValueError, "in_channels must be a positive int"),
        ({"kernel_size": True}, TypeError, "kernel_size must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    kwargs = {"in_channels": 8, **kwargs}
    with pytest.raises(error, match=match):
        ConvPlus2d(**kwargs)


@pytest.mark.parametrize(
    ("module", "x", "error", "match"),
    [
        (ConvPlus2d(8, heads=2), torch.randn(8, 5, 5), ValueError, r"\(4 dims\), got shape \(8, 5, 5\)"),
        (ConvPlus1d(8, heads=2), torch.randn(1, 8, 5, 5), ValueError, r"\(3 dims\)"),
        (ConvPlus3d(8, heads=2), torch.randn(1, 8, 5), ValueError, r"\(5 dims\)"),
        (ConvPlus2d(8, heads=2), torch.randn(1, 6, 5, 5), ValueError, "must have 8 channels"),
        (ConvPlus2d(8, heads=2), torch.ones(1, 8, 5, 5, dtype=torch.int64), TypeError, "floating dtype"),
        (ConvPlus2d(8, heads=2), [[1.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs(module, x, error, match):
    with pytest.raises(error, match=match):
        module(x)


def test_unavailable_backend_is_refused_before_compute():
    module = ConvPlus2d(8, heads=2, window=None)
    module.backend = "local"
    with pytest.raises(ValueError, match="backend 'local' needs a finite window"):
        module(torch.randn(1, 8, 4, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_without_gpu_is_refused():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run here: it needs a CUDA GPU"):
        conv_plus(
            x,
            heads=2,
            kernel=torch.randn(2, 4, 3, 3),
            gain=torch.ones(2),
            window=(3, 3),
            dilation=(1, 1),
            temperature=torch.ones(2),
            backend="triton",
        )


def test_functional_heads_must_divide_channels_for_direct():
    with pytest.raises(ValueError, match=r"heads \(3\) must divide the input channels"):
        conv_plus(
            torch.randn(1, 8, 4),
            heads=3,
            kernel=None,
            gain=torch.ones(3),
            window=(3,),
            dilation=(1,),
            temperature=torch.ones(3),
        )


@pytest.mark.parametrize(
    ("conv", "error", "match"),
    [
        (nn.Conv2d(4, 4, 4, padding=2, groups=4), ValueError, "kernel_size must be odd"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), ValueError, "stride must be 1"),
        (nn.Conv2d(4, 4, 3, padding=0), ValueError, "padding must be dilation"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), ValueError, "padding_mode must be 'zeros'"),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), ValueError, "dense .* or depthwise"),
        (nn.Conv1d(4, 4, 3, padding=1), TypeError, "conv must be a Conv2d, got Conv1d"),
        (nn.Linear(4, 4), TypeError, "conv must be a Conv2d, got Linear"),
    ],
)
def test_from_conv_refuses_what_it_cannot_copy(conv, error, match):
    with pytest.raises(error, match=match):
        ConvPlus2d.from_conv(conv)


def test_from_attention_refuses_cross_attention():
    with pytest.raises(ValueError, match="self-attention"):
        ConvPlus1d.from_attention(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="add_bias_kv"):
        ConvPlus1d.from_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_a_module_checks_its_input_once_per_call(monkeypatch):
    from convplus import functional, modules

    calls = []
    for namespace in (modules, functional):
        checker = namespace.check_input
        monkeypatch.setattr(namespace, "check_input", lambda *a, c=checker: calls.append(1) or c(*a))
    ConvPlus2d(8, heads=2, kernel_size=3)(torch.randn(1, 8, 5, 5))
    assert len(calls) == 1
