"""Every reduction of docs/definition.md, 'Exact reductions', holds to float32 rounding (relative error <= 1e-5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

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


def _neighborhood_mask(grid: tuple[int, ...], window: int, dilation: int) -> torch.Tensor:
    """(N, N) bool, True where j is NOT in N(i): built by brute force from the words of docs/definition.md."""
    points = list(itertools.product(*[range(s) for s in grid]))
    blocked = torch.ones(len(points), len(points), dtype=torch.bool)
    for a, i in enumerate(points):
        for b, j in enumerate(points):
            blocked[a, b] = not all(
                abs(jd - id_) <= (window // 2) * dilation and (jd - id_) % dilation == 0
                for id_, jd in zip(i, j, strict=True)
            )
    return blocked


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
    mask = _neighborhood_mask(grid, window, dilation)
    expected, _ = mha(_flat(x), _flat(x), _flat(x), attn_mask=mask, need_weights=False)
    for backend in ("reference", "local", "global", "cpu"):
        module.backend = backend
        assert rel_err(_flat(module(x)), expected) <= TOL, backend


def test_converted_conv_learns_attention():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    module = MODULES[2].from_conv(conv)
    module(torch.randn(2, 8, 6, 6)).square().mean().backward()
    assert module.gain.grad is not None and module.gain.grad.abs().sum() > 0
    assert module.log_temperature.grad is not None


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
