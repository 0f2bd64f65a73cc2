"""Causal token mixers for sequence models: each maps x (B, L, D) -> (B, L, D), and the output at position t
depends on x[:, :t + 1] only.

- ``ConvPlusMixer``: causal ``ConvPlus1d`` (a window of earlier positions, dilated, or all of them; plus a
  left-padded convolution term).
- ``AttentionMixer``: multi-head self-attention with a causal mask (``F.scaled_dot_product_attention``).
- ``ConvMixer``: linear, left-padded depthwise convolution, linear.

``MIXERS`` maps the names used by ``convplus.models.language`` to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import ConvPlus1d


class ConvPlusMixer(nn.Module):
    """Causal Conv+ over the sequence: ``ConvPlus1d(dim, causal=True, ...)`` on (B, D, L).

    Args:
        dim: D.
        heads: K.
        window: odd, the attention window (the position and ``window - 1`` earlier ones); None = all earlier.
        dilation: of both the window and the convolution term.
        kernel_size: odd, the convolution term's taps (offsets -(k-1)*dilation ... 0).
        score / pos / backend: as ``ConvPlus1d``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int | None = 15,
        dilation: int = 1,
        kernel_size: int = 7,
        score: str = "qk",
        pos: str = "none",
        backend: str = "auto",
    ):
        super().__init__()
        self.conv_plus = ConvPlus1d(
            dim,
            kernel_size=kernel_size,
            window=window,
            heads=heads,
            dilation=dilation,
            score=score,
            pos=pos,
            backend=backend,
            causal=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_plus(x.transpose(1, 2)).transpose(1, 2)


class AttentionMixer(nn.Module):
    """Causal multi-head self-attention: a fused Q/K/V projection, ``F.scaled_dot_product_attention(...,
    is_causal=True)``, an output projection (as GPT-2). ``window``, ``dilation``, ``kernel_size`` are taken
    and ignored, so that one layer plan serves every mixer."""

    def __init__(self, dim: int, heads: int, **_plan):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class ConvMixer(nn.Module):
    """Linear, causal depthwise ``nn.Conv1d`` (left-padded by (kernel_size - 1) * dilation), linear.

    ``heads``, ``window`` and the Conv+ settings are taken and ignored (one layer plan for every mixer)."""

    def __init__(self, dim: int, heads: int, kernel_size: int = 15, dilation: int = 1, **_plan):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        self.value = nn.Linear(dim, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size, dilation=dilation, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.pad(self.value(x).transpose(1, 2), (self.pad, 0))
        return self.proj(self.conv(v).transpose(1, 2))


MIXERS: dict[str, type[nn.Module]] = {"convplus": ConvPlusMixer, "transformer": AttentionMixer, "conv": ConvMixer}
