"""Swap the depthwise convolutions of timm ConvNeXt / ConvNeXt V2 blocks for Conv+ (or any other mixer)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from ..modules import ConvPlus2d

SUPPORTED = "timm ConvNeXt and ConvNeXt V2 models (convnext_*, convnextv2_*, convplus_convnextv2_*)"
_STAGE = re.compile(r"stages[._](\d+)\.")
EXACT_TEMPERATURE = 1.0
"""The 'direct'-score temperature of exactly converted layers (their gains start at 0, so it changes nothing
at step 0): with tau = 1 instead of 10 and --convplus-lr-scale 10 the converted models leave the conv
solution where attention helps (the ablation's conversion study)."""


def convnext_blocks(model: nn.Module) -> list[tuple[int, str, ConvNeXtBlock]]:
    """(stage index, qualified name, block) of every ConvNeXt block, also inside timm feature wrappers."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, ConvNeXtBlock):
            match = _STAGE.search(name + ".")
            if match is None:
                raise ValueError(f"ConvNeXt block {name!r} is not inside a stage; supported: {SUPPORTED}")
            found.append((int(match.group(1)), name, module))
    if not found:
        raise ValueError(f"replace_convplus supports {SUPPORTED}; {type(model).__name__} has no ConvNeXt blocks")
    return found


def replace_mixers(
    model: nn.Module, build: Callable[[nn.Conv2d], nn.Module], stages: Iterable[int] | None = None
) -> nn.Module:
    """Replace each block's depthwise ``conv_dw`` (in all stages, or the listed ones) by ``build(conv)``, in
    place. ``build`` gets the plain conv and returns a module mapping (B, C, H, W) to (B, C, H, W).
    Returns the model."""
    blocks = convnext_blocks(model)
    num_stages = max(stage for stage, _, _ in blocks) + 1
    wanted = set(range(num_stages)) if stages is None else set(stages)
    bad = sorted(s for s in wanted if not isinstance(s, int) or not 0 <= s < num_stages)
    if bad:
        raise ValueError(f"stages must be indices in 0..{num_stages - 1} for this model, got {sorted(wanted)}")
    for stage, _, block in blocks:
        if stage not in wanted:
            continue
        if not isinstance(block.conv_dw, nn.Conv2d):
            raise ValueError(
                f"stage {stage} already uses {type(block.conv_dw).__name__}; only plain conv blocks are replaced"
            )
        block.conv_dw = build(block.conv_dw)
    return model


def replace_convplus(
    model: nn.Module,
    stages: Iterable[int] | None = None,
    exact: bool = True,
    gain: float | None = None,
    temperature: float | None = None,
    **convplus_kwargs,
) -> nn.Module:
    """Replace each block's depthwise ``conv_dw`` (in all stages, or the listed ones) by Conv+, in place.

    ``exact=True``: every conv becomes ``ConvPlus2d.from_conv(conv, **convplus_kwargs)``: the model computes
    exactly what it did (attention gains start at 0; the kwargs may only change what the attention term
    would do, e.g. ``window``, ``heads``, ``pos``) and can learn attention from there: use it on trained
    weights. ``exact=False``: fresh Conv+ layers with both terms on (gains 1), the conv's kernel size and
    ``proj=False`` unless given (the block's pointwise MLP already mixes channels), other settings from
    ``convplus_kwargs`` (``heads``, ``window``, ``score``, ``pos``, ...): use it to train from scratch.
    ``gain``: the initial attention gain g of every new layer (default 0 when exact, which keeps it exact,
    else 1); ``temperature``: the initial 'direct'-score temperature tau (default 1 when exact: a smooth
    map from which the converted layers learn attention, as measured in docs/ablations.md; else the
    layer's own, 10).
    Returns the model.
    """

    def build(conv: nn.Conv2d) -> ConvPlus2d:
        if exact:
            layer = ConvPlus2d.from_conv(conv, **convplus_kwargs)
        else:
            kwargs = {"kernel_size": conv.kernel_size, "proj": False, "bias": conv.bias is not None, **convplus_kwargs}
            layer = ConvPlus2d(conv.in_channels, **kwargs, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            if gain is not None and layer.gain is not None:
                layer.gain.fill_(gain)
            if temperature is not None and layer.log_temperature is not None:
                layer.log_temperature.fill_(math.log(temperature))
        return layer

    if temperature is None and exact:
        temperature = EXACT_TEMPERATURE
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return replace_mixers(model, build, stages)
