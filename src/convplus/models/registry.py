"""timm-registered Conv+ ConvNeXt V2 models: ``timm.create_model("convplus_convnextv2_tiny", ...)``.

Each is timm's ``convnextv2_<size>`` with every depthwise 7x7 conv replaced by a fresh Conv+ layer. The
default configuration is the same for every size (see docs/models.md for the reasoning):

- ``kernel_size=7`` and ``proj=False``: the conv term is ConvNeXt's own 7x7 depthwise conv and no channel
  projections are added, so parameters and the conv-term FLOPs stay those of the plain model; the block's
  MLP already mixes channels.
- ``heads=4``, ``score='direct'``, ``pos='sincos'``: content scores from the features themselves (no Q/K
  parameters); every ConvNeXt V2 width is divisible by 4.
- ``window=7`` (local, linear in image size) in stages 0-2, ``window=None`` (global) in the last stage,
  where the grid is smallest (7x7 at 224x224) and long-range context is cheapest.
"""

from __future__ import annotations

import timm
from timm.models import register_model
from torch import nn

from .replace import convnext_blocks, replace_convplus

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
LOCAL = {"kernel_size": 7, "window": 7, "heads": 4, "score": "direct", "pos": "sincos", "proj": False}
GLOBAL_STAGES = (3,)


def stage_configs(global_stages: tuple[int, ...] = GLOBAL_STAGES) -> tuple[dict, ...]:
    """Conv+ settings per stage: ``LOCAL``, with window=None (global attention) in ``global_stages``."""
    return tuple({**LOCAL, "window": None} if stage in global_stages else LOCAL for stage in range(4))


STAGE_CONFIGS = stage_configs()
"""Conv+ settings per stage of the registered models (by default)."""


def convplus_convnextv2(
    size: str, pretrained: bool = False, global_stages: tuple[int, ...] = GLOBAL_STAGES, **kwargs
) -> nn.Module:
    """``convnextv2_<size>`` with Conv+ mixers (``stage_configs(global_stages)``); timm kwargs (num_classes,
    drop_path_rate, features_only, out_indices, ...) pass through. Weights come from a local file: see
    ``load_pretrained``."""
    if pretrained:
        raise ValueError(
            "convplus models have no downloadable weights: create with pretrained=False and load a local "
            "ConvNeXt V2 checkpoint with convplus.models.load_pretrained(model, path)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = timm.create_model(f"convnextv2_{size}", pretrained=False, **kwargs)
    configs = stage_configs(tuple(global_stages))
    present = {stage for stage, _, _ in convnext_blocks(model)}  # features_only may drop late stages
    for stage in sorted(present):
        replace_convplus(model, stages=[stage], **configs[stage])
    return model


def _register(size: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        """kwargs: timm's ConvNeXt arguments, and ``global_stages`` (default (3,))."""
        return convplus_convnextv2(size, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"convplus_convnextv2_{size}"
    entrypoint.__doc__ = f"ConvNeXt V2 {size} with Conv+ mixers (see convplus.models.registry)."
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _size in SIZES:
    _register(_size)
