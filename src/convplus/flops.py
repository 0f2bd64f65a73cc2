"""FLOP counting for models with Conv+ layers.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and SDPA. The 'local' backend's
windowed scores and aggregation are elementwise multiply-adds that it does not see, so they are added here:
2 * B * N * W * K * Dq for the scores and 2 * B * N * W * K * d for the aggregation, with W the number of
window offsets that fit the grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import backends
from .modules import _ConvPlusNd
from .neighborhood import reachable_halves


def _windowed_flops(module: _ConvPlusNd, x: torch.Tensor) -> int:
    """FLOPs of the local window's scores and aggregation for input x, 0 if another backend runs it."""
    spatial = tuple(x.shape[2:])
    if module.gain is None or module.window is None:
        return 0
    name = module.backend
    if name == "auto":
        name = backends.select(spatial, x.device, module.window, module.dilation)
    if name not in ("local", "cpu"):
        return 0
    offsets = math.prod(2 * h + 1 for h in reachable_halves(spatial, module.window, module.dilation))
    qk_dim = module.in_channels // module.heads if module.score == "direct" else module.qk_dim
    return 2 * x.shape[0] * math.prod(spatial) * offsets * module.heads * (qk_dim + module.head_dim)


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Total forward FLOPs of ``model`` on ``x`` (a multiply-add counts 2)."""
    extra = [0]
    hooks = [
        m.register_forward_hook(lambda mod, args, out: extra.__setitem__(0, extra[0] + _windowed_flops(mod, args[0])))
        for m in model.modules()
        if isinstance(m, _ConvPlusNd)
    ]
    was_training = model.training
    try:
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() + extra[0]
