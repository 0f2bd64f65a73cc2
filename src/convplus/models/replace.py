"""Swap the depthwise convolutions of timm ConvNeXt / ConvNeXt V2 blocks for Conv+."""

from __future__ import annotations

import re
from collections.abc import Iterable

from timm.models.convnext import ConvNeXtBlock
from torch import nn

from ..modules import ConvPlus2d

SUPPORTED = "timm ConvNeXt and ConvNeXt V2 models (convnext_*, convnextv2_*, convplus_convnextv2_*)"
_STAGE = re.compile(r"stages[._](\d+)\.")


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


def replace_convplus(model: nn.Module, stages: Iterable[int] | None = None, **convplus_kwargs) -> nn.Module:
    """Replace each block's depthwise ``conv_dw`` (in all stages, or the listed ones) by Conv+, in place.

    Without ``convplus_kwargs`` every conv becomes ``ConvPlus2d.from_conv(conv)``: the model computes exactly
    what it did (attention gains start at 0) and can learn attention from there. With kwargs (``heads``,
    ``window``, ``score``, ``pos``, ...) fresh Conv+ layers are built instead, with the conv's kernel size
    and ``proj=False`` unless given (the block's pointwise MLP already mixes channels).
    Returns the model.
    """
    blocks = convnext_blocks(model)
    num_stages = max(stage for stage, _, _ in blocks) + 1
    wanted = set(range(num_stages)) if stages is None else set(stages)
    bad = sorted(s for s in wanted if not isinstance(s, int) or not 0 <= s < num_stages)
    if bad:
        raise ValueError(f"stages must be indices in 0..{num_stages - 1} for this model, got {sorted(wanted)}")
    for stage, _, block in blocks:
        if stage not in wanted:
            continue
        conv = block.conv_dw
        if isinstance(conv, ConvPlus2d):
            raise ValueError(f"stage {stage} already uses Conv+; replace_convplus applies to plain conv blocks")
        if not convplus_kwargs:
            block.conv_dw = ConvPlus2d.from_conv(conv)
            continue
        kwargs = {"kernel_size": conv.kernel_size, "proj": False, "bias": conv.bias is not None, **convplus_kwargs}
        block.conv_dw = ConvPlus2d(conv.in_channels, **kwargs, device=conv.weight.device, dtype=conv.weight.dtype)
    return model
