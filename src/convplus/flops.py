"""FLOP counting for models with Conv+ layers (a multiply-add counts 2).

``count_flops`` counts every layer but the Conv+ ones with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, SDPA; elementwise ops are free), and each Conv+ layer analytically from its
configuration and input size (``conv_plus_flops``): the same count on every backend and device, whatever the
profiler happens to see of a fused kernel (it sees neither the C++ kernel's window nor the Triton kernels).

The Conv+ convention, for input (B, C_in, *S), N = prod(S), K heads of d channels, Dq score channels per head
(C_in / K for 'direct'):

    value projection         2 B N C_in K d          (proj=True)
    query and key proj.      2 x 2 B N C_in K Dq     (score='qk')
    scores                   2 B N W K Dq            (attention term)
    aggregation              2 B N W K d             (attention term)
    convolution term         2 B N K d prod(kernel_size)
    output projection        2 B N K d C_out         (proj=True)

W, the keys each query scores, is the product over dims of the window's points that fit in the grid (border
positions included, as the windowed backends compute them): 2 min(w // 2, reach) + 1 for a centred
('clip') window, min(w, reach + 1) for a causal or 'shift' window, reach = (size - 1) // dilation; or N when
the window covers the grid (global attention, as SDPA counts it, causal or not). The positional encoding,
normalization, softmax, gain and biases are elementwise: free, as in FlopCounterMode. On the 'local'
backend (no fused kernel) the profiler's count of the layer plus the window multiply-adds it cannot see gives
exactly this.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modules import _ConvPlusNd
from .neighborhood import Neighborhood, covers_grid


def keys_per_query(spatial: tuple[int, ...], hood: Neighborhood) -> int:
    """W of the convention above: the window's points that fit in the grid, or N = prod(spatial) for global
    attention."""
    if hood.window is None or covers_grid(spatial, hood.window, hood.dilation):
        return math.prod(spatial)
    keys = 1
    for s, w, r, c in zip(spatial, hood.window, hood.dilation, hood.causal, strict=True):
        reach = (s - 1) // r
        keys *= min(w, reach + 1) if c or hood.border == "shift" else 2 * min(w // 2, reach) + 1
    return keys


def conv_plus_flops(module: _ConvPlusNd, x: torch.Tensor) -> int:
    """Forward FLOPs of the Conv+ layer ``module`` on x (B, C_in, *S), by the convention above."""
    spatial = tuple(x.shape[2:])
    positions = x.shape[0] * math.prod(spatial)  # B N
    inner = module.heads * module.head_dim  # K d
    per_position = 0
    if module.value_weight is not None:
        per_position += module.in_channels * inner + inner * module.out_channels
    if module.gain is not None:
        qk_dim = module.in_channels // module.heads if module.score == "direct" else module.qk_dim
        if module.score == "qk":
            per_position += 2 * module.in_channels * module.heads * qk_dim
        keys = keys_per_query(spatial, module.neighborhood)
        per_position += keys * module.heads * (qk_dim + module.head_dim)
    if module.kernel is not None:
        per_position += inner * math.prod(module.kernel_size)
    return 2 * positions * per_position


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Total forward FLOPs of ``model`` on ``x``: the profiler's count, with each Conv+ layer's share replaced
    by ``conv_plus_flops``."""
    counter = FlopCounterMode(display=False)
    correction = [0]  # sum over Conv+ layers of (analytic count - what the profiler saw inside the layer)

    def before(module: nn.Module, args: tuple) -> None:
        correction[0] += counter.get_total_flops()

    def after(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        correction[0] += conv_plus_flops(module, args[0]) - counter.get_total_flops()

    hooks = []
    for m in model.modules():
        if isinstance(m, _ConvPlusNd):
            hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    was_training = model.training
    try:
        model.eval()
        with counter:
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() + correction[0]
