"""Shared helpers for the test suite."""

from __future__ import annotations

import pytest
import torch

from convplus import ConvPlus1d, ConvPlus2d, ConvPlus3d

MODULES = {1: ConvPlus1d, 2: ConvPlus2d, 3: ConvPlus3d}
CONVS = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1): relative error, absolute below unit scale."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def forward_backward(module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """module(x) and the gradients of x and of every parameter, for a fixed, non-uniform output gradient."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    grads = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
