"""Every reduction of docs/definition.md, 'Exact reductions', holds to float32 rounding (relative error <= 1e-5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from . import oracle
from .conftest import CONVS, MODULES, rel_err

TOL = 1e-5
# (n, grid): non-square grids, grids smaller than the kernel/window, and one-pixel-thin grids.
GRIDS = [(1, (9,)), (1, (2,)), (2, (7, 10)), (2, (2, 3)), (2, (1, 6)), (3, (3, 4, 5)), (3, (2, 1, 3))]


@pytest.mark.parametrize(("n", "grid"), GRIDS)
@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (5, 1), (3, 2), (7, 1)])
@pytest.mark.parametrize("heads", [1, 2, 8])
def test_depthwise_conv(n, grid, kernel, dilation, heads):
    channels = 8
    conv = CONVS[n](channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=channels)
    module = MODULES[n].from_conv(conv, heads=heads)
    assert module.heads == heads and not module.proj
    assert torch.all(module.gain == 0)
    x = torch.randn(2, channels, *grid)
    assert rel_err(module(x), conv(x)) <= TOL


@pytest.mark.parametrize(("n", "grid"), GRIDS)
@pytest.mark.parametrize(("kernel", "dilation"), [(1, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_conv(n, grid, kernel, dilation, bias):
    conv = CONVS[n](3, 5, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=bias)
    module = MODULES[n].from_conv(conv)
    assert module.heads == kernel**n and module.head_dim == 5
    x = torch.randn(2, 3, *grid)
    assert rel_err(module(x), conv(x)) <= TOL


def test_dense_conv_direct_score_when_heads_divide_channels():
    conv = nn.Conv2d(9, 4, 3, padding=1)
    module = MODULES[2].from_conv(conv)
    assert module.score == "direct"
    x = torch.randn(2, 9, 5, 6)
    assert rel_err(module(x), conv(x)) <= TOL


def test_conv_padding_same_string_is_accepted():
    conv = nn.Conv2d(4, 4, 5, padding="same", groups=4)
    x = torch.randn(1, 4, 6, 7)
    assert rel_err(MODULES[2].from_conv(conv)(x), conv(x)) <= TOL


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, E, *S) -> (B, N, E), grid flattened row-major."""
    return torch.flatten(x, 2).transpose(1, 2)


@pytest.mark.parametrize(("n", "grid"), GRIDS)
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention(n, grid, bias):
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=True).eval()
    module = MODULES[n].from_attention(mha)
    x = torch.randn(2, 8, *grid)
    expected, _ = mha(_flat(x), _flat(x), _flat(x), need_weights=False)
    assert rel_err(_flat(module(x)), expected) <= TOL


@pytest.mark.parametrize(("n", "grid"), GRIDS)
@pytest.mark.parametrize(("window", "dilation"), [(3, 1), (3, 2), (5, 1), (1, 1)])
def test_neighborhood_attention(n, grid, window, dilation):
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    module = MODULES[n].from_attention(mha, window=window, dilation=dilation)
    x = torch.randn(2, 8, *grid)
    mask = oracle.neighborhood_blocked(grid, (window,) * n, (dilation,) * n)
    expected, _ = mha(_flat(x), _flat(x), _flat(x), attn_mask=mask, need_weights=False)
    for backend in ("reference", "local", "global", "cpu"):
        module.backend = backend
        assert rel_err(_flat(module(x)), expected) <= TOL, backend


def _finite_difference(loss, parameter: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d loss() / d parameter by central differences, entry by entry (float64)."""
    grad = torch.zeros_like(parameter)
    with torch.no_grad():
        for index in range(parameter.numel()):
            entry = parameter.view(-1)[index : index + 1]
            entry += eps
            ahead = loss()
            entry -= 2 * eps
            behind = loss()
            entry += eps
            grad.view(-1)[index] = (ahead - behind) / (2 * eps)
    return grad


@pytest.mark.parametrize("backend", ["reference", "local", "cpu"])
def test_converted_conv_learns_attention(backend):
    """At g = 0 the attention term does not reach the output, yet dL/dg_k = <dL/dz_k, attention term_k>
    is its full value (the temperature, which acts only through g, gets exactly zero); once g moves, the
    temperature learns too. Every gradient is checked against finite differences."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8).double()
    module = MODULES[2].from_conv(conv, backend=backend)
    x, target = torch.randn(2, 2, 8, 6, 6, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (module(x) - target).square().mean()

    loss().backward()
    gain_grad = module.gain.grad.clone()
    torch.testing.assert_close(gain_grad, _finite_difference(loss, module.gain), rtol=1e-6, atol=1e-9)
    assert gain_grad.abs().min() > 1e-3
    assert torch.count_nonzero(module.log_temperature.grad) == 0
    with torch.no_grad():
        module.gain -= 10 * gain_grad
    module.zero_grad()
    loss().backward()
    temperature_grad = module.log_temperature.grad
    torch.testing.assert_close(temperature_grad, _finite_difference(loss, module.log_temperature), rtol=1e-6, atol=1e-9)
    assert temperature_grad.abs().min() > 1e-4


def test_converted_attention_learns_convolution():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    module = MODULES[1].from_attention(mha, window=5)
    assert module.kernel_size == (5,)
    module(torch.randn(2, 8, 11)).square().mean().backward()
    assert module.kernel.grad.abs().sum() > 0


def test_dense_conv_value_layout():
    """V_k is W_delta_k x with deltas in row-major kernel order and r_k one-hot at delta_k."""
    conv = nn.Conv2d(2, 3, 3, padding=1)
    module = MODULES[2].from_conv(conv)
    for head, delta in enumerate(itertools.product(range(3), range(3))):
        assert torch.equal(module.value_weight.view(9, 3, 2)[head], conv.weight[:, :, delta[0], delta[1]])
        assert module.kernel[head].sum().item() == 3 and math.isclose(module.kernel[head, 0][delta].item(), 1.0)
