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

from collections.abc import Callable

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .replace import replace_convplus

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
LOCAL = {"kernel_size": 7, "window": 7, "heads": 4, "score": "direct", "pos": "sincos", "proj": False}
GLOBAL_STAGES = (3,)


def stage_configs(global_stages: tuple[int, ...] = GLOBAL_STAGES) -> tuple[dict, ...]:
    """Conv+ settings per stage: ``LOCAL``, with window=None (global attention) in ``global_stages``."""
    return tuple({**LOCAL, "window": None} if stage in global_stages else LOCAL for stage in range(4))


STAGE_CONFIGS = stage_configs()
"""Conv+ settings per stage of the registered models (by default)."""

default_cfgs = generate_default_cfgs(
    {
        f"convplus_convnextv2_{size}": {
            "url": "",  # no downloadable weights: see load_pretrained / ``convplus convert``
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.0",
            "classifier": "head.fc",
            "license": "apache-2.0",
        }
        for size in SIZES
    }
)
"""timm pretrained configs (the ImageNet-1k preprocessing of timm's ``convnextv2_*``), read by
``register_model``: ``model.pretrained_cfg``, ``timm.data.resolve_data_config({}, model=model)``."""


def convplus_convnextv2(
    size: str, pretrained: bool = False, global_stages: tuple[int, ...] = GLOBAL_STAGES, **kwargs
) -> nn.Module:
    """``convnextv2_<size>`` with Conv+ mixers (``stage_configs(global_stages)``); timm kwargs (num_classes,
    drop_path_rate, features_only, out_indices, feature_cls, pretrained_cfg_overlay, ...) pass through. Weights
    come from a local file: see ``load_pretrained``."""
    if pretrained:
        raise ValueError(
            "convplus models have no downloadable weights: create with pretrained=False and load a local "
            "ConvNeXt V2 checkpoint with convplus.models.load_pretrained(model, path)"
        )
    configs = stage_configs(tuple(global_stages))

    def build(**model_kwargs) -> nn.Module:
        model = timm.create_model(f"convnextv2_{size}", **model_kwargs)
        for stage, config in enumerate(configs):
            replace_convplus(model, stages=[stage], **config)
        return model

    # timm's builder attaches the pretrained cfg and wraps features_only models (after the replacement)
    return build_model_with_cfg(
        build,
        f"convplus_convnextv2_{size}",
        pretrained=False,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
        **kwargs,
    )


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


def register_builder(name: str, build: Callable[..., nn.Module], doc: str, module: str) -> None:
    """Register ``build(**kwargs)`` with timm as model ``name`` (documented by ``doc``, listed under
    ``module``): ``timm.create_model(name, **kwargs)`` calls it. These models have no downloadable weights."""

    def entrypoint(
        pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs
    ) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name} has no downloadable weights: create it with pretrained=False")
        return build(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    entrypoint.__module__ = module
    register_model(entrypoint)
