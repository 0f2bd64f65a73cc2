"""The sketch that Conv+ was drawn from, as its own module, so the ablation can measure what the definition
changes: K 1x1 projections of x, summed under ONE global softmax map computed from (x + P)(x + P)^T / sqrt(C),
and no convolution term.

    y_i = sum_j softmax_j(<x^_i, x^_j> / sqrt(C)) sum_k W_k x_j + b,      x^ = x + P (sine-cosine)

Because the map is shared, sum_k W_k is one matrix: K is redundant (the first defect the definition fixes),
and a softmax only approaches a convolution in a limit (the second).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..positional import sincos_encoding


class SeedSketch2d(nn.Module):
    """The sketch on (B, C, H, W) -> (B, C, H, W).

    projections: K. depthwise: each W_k is a per-channel scale (K * C weights, the parameter budget of a
    depthwise conv with K taps, as a block's depthwise mixer has) instead of a full C x C matrix.
    """

    def __init__(self, channels: int, projections: int = 4, depthwise: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.channels, self.projections, self.depthwise = channels, projections, depthwise
        shape = (projections, channels) if depthwise else (projections, channels, channels)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        bound = 1.0 / math.sqrt(projections * (1 if depthwise else channels))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *grid = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        scored = tokens + sincos_encoding(c, tuple(grid), x.dtype, x.device).flatten(1).T
        summed = self.weight.sum(0)  # sum_k W_k: the K projections collapse into one
        values = tokens * summed if self.depthwise else tokens @ summed.T
        mixed = F.scaled_dot_product_attention(scored, scored, values, scale=1.0 / math.sqrt(c))  # one map
        if self.bias is not None:
            mixed = mixed + self.bias
        return mixed.transpose(1, 2).reshape(b, c, *grid)

    def extra_repr(self) -> str:
        return f"{self.channels}, projections={self.projections}, depthwise={self.depthwise}"
