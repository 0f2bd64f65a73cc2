"""Every backend against Conv+ written out from its definition in the test suite (tests/oracle.py), float64.

The oracle shares no code with the library, so this catches bugs in the pieces every backend shares with
'reference' (positional encoding, score features, values, softmax, convolution term, projections), forward
and backward.
"""

from __future__ import annotations

import pytest
import torch

from . import oracle
from .conftest import MODULES, rel_err

TOL = 1e-12
CHANNELS = 8
# (n, grid, module settings): dilation, windows clipped at the grid's edges or wider than the grid, a kernel
# reaching past the window, leftover sincos channels (8 channels over 3 dims), global attention, no
# projections, learned and no positional encoding, head_dim != C / K.
CASES = [
    (1, (11,), {"kernel_size": 3, "window": 5, "dilation": 2}),
    (1, (9,), {"kernel_size": 5, "window": 3, "out_channels": 5, "head_dim": 3, "pos": "none"}),
    (2, (5, 6), {"kernel_size": 3, "window": 3}),
    (2, (5, 4), {"kernel_size": 5, "window": (3, 7), "dilation": (2, 1)}),
    (2, (4, 5), {"kernel_size": 3, "window": None}),
    (2, (5, 6), {"kernel_size": 3, "window": 5, "proj": False, "pos": "learned", "pos_size": (5, 6)}),
    (3, (3, 4, 5), {"kernel_size": 3, "window": 3}),
    (3, (4, 3, 3), {"kernel_size": 3, "window": (3, 1, 5), "dilation": (2, 1, 1)}),
]


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random and non-trivial: gains of both signs, temperatures in [1, e^3]."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "log_temperature":
                p.uniform_(0.0, 3.0)
            elif name == "gain":
                p.uniform_(-1.5, 1.5)
            else:
                p.normal_(0.0, 0.5)
    return module


def _outputs_and_grads(fn, x: torch.Tensor, module: torch.nn.Module, weight: torch.Tensor):
    """fn(x), and the gradients of <fn(x), weight> with respect to x and every parameter."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad((y * weight).sum(), [x, *module.parameters()])
    return y.detach(), grads


@pytest.mark.parametrize("score", ["direct", "qk"])
@pytest.mark.parametrize(("n", "grid", "kwargs"), CASES)
def test_every_backend_matches_the_definition(n, grid, kwargs, score):
    heads = 2
    module = _randomized(MODULES[n](CHANNELS, heads=heads, score=score, dtype=torch.float64, **kwargs))
    x = torch.randn(2, CHANNELS, *grid, dtype=torch.float64)
    weight = torch.randn(2, module.out_channels, *grid, dtype=torch.float64)
    expected, expected_grads = _outputs_and_grads(lambda t: oracle.conv_plus(module, t), x, module, weight)
    windowed = module.window is not None
    for backend in ("reference", "global", *(("local", "cpu") if windowed else ())):
        module.backend = backend
        y, grads = _outputs_and_grads(module, x, module, weight)
        assert rel_err(y, expected) <= TOL, (backend, "forward")
        for (name, _), grad, expected_grad in zip(
            [("x", x), *module.named_parameters()], grads, expected_grads, strict=True
        ):
            assert rel_err(grad, expected_grad) <= TOL, (backend, name)


def test_oracle_neighborhood_clips_at_the_edges():
    """The brute-force neighborhood itself: a corner of a 2-d grid sees only its in-grid quarter window."""
    blocked = oracle.neighborhood_blocked((4, 5), (3, 5), (1, 2))
    assert (~blocked[0]).sum() == 2 * 3  # rows {0, 1} x columns {0, 2, 4}
    assert torch.equal(~blocked, (~blocked).T)
