"""ConvNeXt-style video networks: clips (B, C, T, H, W) -> class logits (B, num_classes), with 3-d Conv+ or
3-d depthwise convolution as the spatio-temporal mixer of every block, at matched parameter counts.

Stem: a (1, 2, 2) patchify conv; stages of ConvNeXt blocks (mixer, LayerNorm, MLP 4x with GELU, residual with
stochastic depth), each later stage after a (1, 2, 2) downsampling (time keeps its length); global average
pool, LayerNorm, linear head. The Conv+ mixer is ``ConvPlus3d(proj=False, score='direct')``: its
convolution term has exactly the depthwise conv's weights, so the two networks differ by 2 numbers per head
and layer (gain and temperature). ``causal_time=True`` makes every mixer causal along time (a frame sees
itself and earlier frames only).

Registered with timm: ``{convplus,conv}_video_{tiny,small}`` (``convplus train --task video --model
convplus_video_tiny``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..modules import ConvPlus3d
from .registry import register_builder

SIZES = {
    "tiny": {"dims": (32, 64), "depths": (2, 2), "global_stages": (1,)},
    "small": {"dims": (48, 96, 192), "depths": (2, 2, 2), "global_stages": (2,)},
}
"""Registered sizes; Conv+ attends over the whole clip in the last stage (the smallest grid)."""


class ChannelsFirstNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, *S)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise 3-d conv, 'same' size: zero padding of kernel // 2 per side, or, with ``causal_time``, of
    kernel - 1 before the first frame and none after (a frame sees itself and earlier frames)."""

    def __init__(self, dim: int, kernel_size: tuple[int, int, int], causal_time: bool = False):
        super().__init__(dim, dim, kernel_size, groups=dim)
        t, h, w = kernel_size
        self.pad = (w // 2, w // 2, h // 2, h // 2, t - 1 if causal_time else t // 2, 0 if causal_time else t // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def mixer(
    kind: str,
    dim: int,
    kernel_size: tuple[int, int, int],
    window: tuple[int, ...] | None,
    heads: int,
    causal_time: bool,
) -> nn.Module:
    """The spatio-temporal mixer of a block: 'convplus' (``ConvPlus3d``, attention over ``window``; None =
    the whole clip) or 'conv' (``DepthwiseConv3d``)."""
    if kind == "conv":
        return DepthwiseConv3d(dim, kernel_size, causal_time)
    if kind == "convplus":
        return ConvPlus3d(
            dim,
            kernel_size=kernel_size,
            window=window,
            heads=heads,
            proj=False,
            score="direct",
            pos="sincos",
            causal=(causal_time, False, False),
        )
    raise ValueError(f"mixer must be 'convplus' or 'conv', got {kind!r}")


class Block(nn.Module):
    """ConvNeXt block on (B, C, T, H, W): x + drop_path(mlp(norm(mixer(x))))."""

    def __init__(self, dim: int, mix: nn.Module, drop_path: float):
        super().__init__()
        self.mixer, self.norm = mix, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.mixer(x).movedim(1, -1))).movedim(-1, 1)
        return x + self.drop_path(y)


class VideoNet(nn.Module):
    """Clips (B, in_chans, T, H, W) (H, W divisible by 2**len(dims)) -> logits (B, num_classes).

    Args:
        mixer: 'convplus' or 'conv'.
        dims, depths: channels and blocks per stage.
        kernel_size: (t, h, w), odd: the depthwise kernel (Conv+'s convolution term).
        window: Conv+'s attention window (default ``kernel_size``) in stages not in ``global_stages``.
        global_stages: stages whose Conv+ attends over the whole clip (window=None).
        heads: Conv+ heads (must divide every dim).
        causal_time: every mixer causal along time.
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks.
    """

    def __init__(
        self,
        mixer_kind: str = "convplus",
        num_classes: int = 8,
        in_chans: int = 1,
        dims: Sequence[int] = (32, 64),
        depths: Sequence[int] = (2, 2),
        kernel_size: Sequence[int] = (3, 5, 5),
        window: Sequence[int] | None = None,
        global_stages: Sequence[int] = (),
        heads: int = 4,
        causal_time: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {tuple(dims)} and depths {tuple(depths)} must have one entry per stage")
        kernel_size = tuple(kernel_size)
        window = kernel_size if window is None else tuple(window)
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv3d(in_chans, dims[0], (1, 2, 2), stride=(1, 2, 2)), ChannelsFirstNorm(dims[0]))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            down = (
                nn.Sequential(ChannelsFirstNorm(dims[i - 1]), nn.Conv3d(dims[i - 1], dim, (1, 2, 2), stride=(1, 2, 2)))
                if i
                else nn.Identity()
            )
            reach = None if i in global_stages else window
            blocks = [
                Block(dim, mixer(mixer_kind, dim, kernel_size, reach, heads, causal_time), rates.pop(0))
                for _ in range(depth)
            ]
            stages.append(nn.Sequential(down, *blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((2, 3, 4))))


def _register(kind: str, size: str) -> None:
    def build(**kwargs) -> nn.Module:
        return VideoNet(kind, **{**SIZES[size], **kwargs})

    register_builder(
        f"{kind}_video_{size}",
        build,
        f"ConvNeXt-style video network with {kind} mixers, {size} size (see convplus.models.video).",
        __name__,
    )


for _kind in ("convplus", "conv"):
    for _size in SIZES:
        _register(_kind, _size)
