"""The ablation's two backbones, with their depthwise mixers swapped per variant (``variants.py``).

- ``isotropic``: a ConvNeXt column (as ConvMixer / ViT keep one grid): a 2x2 stride-2 patch stem, then
  ``depth`` ConvNeXt blocks of width ``dim`` on one grid: 16x16 cells for 32x32 images. With 3x3 mixers
  a conv column sees depth * (3 - 1) + 1 = 9 of the 16 cells per side, and nothing else reaches further:
  the blocks have no global response normalisation (ConvNeXt V2's GRN mixes statistics of the whole
  grid into every cell) and the head normalises each cell before the average pool and the linear
  classifier. The logit is then a sum over cells of what each cell sees: a model none of whose cells sees
  both of two distant parts computes an additive function of them, which cannot tell "same" from
  "different" (a conv column is provably at chance on the long-range tasks; attention is not).
- ``hierarchical``: ConvNeXt V2 (timm ``convnextv2_atto`` with smaller widths) with a 2x2 stem instead of
  4x4, as CIFAR networks use: stage grids 16, 8, 4, 2 for 32x32 images, 7x7 mixers. Its GRN and its
  pooled-then-normalised head are global, as in ConvNeXt V2: its receptive field is that of the mixers.

Both are registered with timm as ``convplus_ablation`` (``backbone``, ``mixer``, ``mixer_kwargs``,
``frozen_gain``), so every ablation run is an ordinary ``convplus train --model convplus_ablation`` run.
"""

from __future__ import annotations

import copy
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from timm.models import FeatureListNet, register_model
from timm.models._manipulate import named_apply
from timm.models.convnext import ConvNeXtStage, _init_weights
from torch import nn

from ..models.replace import replace_convplus, replace_mixers
from ..modules import ConvPlus2d
from .sketch import SeedSketch2d

BACKBONES: dict[str, dict[str, Any]] = {
    "isotropic": {"dim": 24, "depth": 4, "patch_size": 2, "kernel_size": 3},
    "hierarchical": {"depths": (1, 1, 2, 1), "dims": (16, 32, 64, 128), "patch_size": 2, "kernel_sizes": 7},
}
MIXERS = ("conv", "convplus", "sketch")


class IsotropicConvNeXt(nn.Module):
    """Patch stem -> ``depth`` ConvNeXt blocks on one grid -> per-cell LayerNorm, average pool, linear head.

    x: (B, in_chans, H, W) -> logits (B, num_classes); features (B, dim, H / patch_size, W / patch_size).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dim: int = 24,
        depth: int = 4,
        patch_size: int = 2,
        kernel_size: int = 3,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, dim, dim
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), LayerNorm2d(dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.stages = nn.Sequential(ConvNeXtStage(dim, dim, kernel_size, stride=1, depth=depth, drop_path_rates=rates))
        self.norm = LayerNorm2d(dim)  # per cell: the pooled logit stays a sum of what each cell sees
        self.head = nn.Linear(dim, num_classes)
        self.feature_info = [{"num_chs": dim, "reduction": patch_size, "module": "stages.0"}]
        named_apply(_init_weights, self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.norm(x).mean((2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_backbone(backbone: str, **timm_kwargs) -> nn.Module:
    """The plain (conv) backbone; ``timm_kwargs`` (num_classes, in_chans, drop_path_rate, or any setting of
    ``BACKBONES``) override its defaults."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    settings = {**BACKBONES[backbone], **timm_kwargs}
    if backbone == "isotropic":
        return IsotropicConvNeXt(**settings)
    model = timm.create_model("convnextv2_atto", **settings)
    model.stages[0].downsample = nn.Identity()  # timm halves a stride-2 stem's grid again in stage 0
    for info in model.feature_info:  # so every stage's grid is twice timm's
        info["reduction"] //= 2
    return model


@register_model
def convplus_ablation(
    pretrained: bool = False,
    backbone: str = "isotropic",
    mixer: str = "conv",
    mixer_kwargs: dict[str, Any] | None = None,
    frozen_gain: bool = False,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    **kwargs,
) -> nn.Module:
    """An ablation backbone with every depthwise conv kept (``mixer='conv'``), replaced by a fresh Conv+
    (``'convplus'``, ``mixer_kwargs`` for ``ConvPlus2d``; ``frozen_gain``: gains fixed at their initial 1) or
    by the seed sketch (``'sketch'``: ``SeedSketch2d`` with one depthwise projection per conv tap, so the
    parameters match the conv's).

    ``features_only``: timm's ``FeatureListNet`` of the stage outputs ``out_indices`` (default: all), a list
    of (B, C_i, H / r_i, W / r_i) with ``feature_info`` giving C_i and r_i (the backbone for a segmenter)."""
    if pretrained:
        raise ValueError("convplus_ablation has no pretrained weights: train it (convplus ablate / convplus train)")
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {', '.join(MIXERS)}, got {mixer!r}")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model passes these
        kwargs.pop(key, None)
    model = build_backbone(backbone, **kwargs)
    if mixer == "convplus":
        replace_convplus(model, exact=False, **(mixer_kwargs or {}))
    elif mixer == "sketch":
        replace_mixers(model, lambda conv: SeedSketch2d(conv.in_channels, conv.weight[0].numel(), depthwise=True), None)
    if frozen_gain:
        for module in model.modules():
            if isinstance(module, ConvPlus2d) and module.gain is not None:
                module.gain.requires_grad_(False)
    if features_only:
        return FeatureListNet(model, out_indices or tuple(range(len(model.feature_info))), flatten_sequential=True)
    return model


def receptive_field(model: nn.Module, img_size: int, in_chans: int) -> int:
    """Receptive field (pixels per side, at most ``img_size``) of the central cell of the last feature map:
    the extent of the input pixels its gradient reaches, for generic parameters (a copy of the model with
    every parameter drawn at random, so that a path switched off at initialisation, such as a gain or a
    GRN scale of 0, still counts)."""
    generic = copy.deepcopy(model).eval()
    with torch.no_grad():
        for param in generic.parameters():
            param.normal_(0.0, 0.1)  # small: no saturated softmax cuts a path to exactly 0
    x = torch.randn(1, in_chans, img_size, img_size, requires_grad=True)
    features = generic.forward_features(x)
    h, w = features.shape[2:]
    features[0, :, h // 2, w // 2].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0  # (H, W)
    rows, cols = reached.any(1).nonzero(), reached.any(0).nonzero()
    return int(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))


@torch.no_grad()
def grid_sizes(model: nn.Module, img_size: int, in_chans: int) -> list[int]:
    """The grid side of each stage's output for an ``img_size`` image."""
    sizes: list[int] = []
    hooks = [s.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1])) for s in model.stages]
    try:
        model.eval()
        model(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes
