"""A timm backbone under torchvision's Feature Pyramid Network, for detection and segmentation.

``timm_fpn(name, ...)`` builds ``timm.create_model(name, features_only=True)`` (any timm model that supports
it: ``convplus_convnextv2_*``, ``convnextv2_*``, ``resnet*``, ...), wraps it so that it returns the
``OrderedDict`` of feature maps torchvision expects, and puts torchvision's ``FeaturePyramidNetwork`` on top,
as torchvision's ``BackboneWithFPN`` does for its own backbones. Weights come from a local file:
``load_backbone_weights``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from ..modules import ConvPlus2d
from .pretrained import CheckpointError, read_state_dict, to_convplus_keys


class TimmFeatures(nn.Module):
    """A timm ``features_only`` model returning ``OrderedDict(str(i) -> (B, C_i, H / s_i, W / s_i))``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.channels: list[int] = body.feature_info.channels()
        self.strides: list[int] = body.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))


class TimmWithFPN(nn.Module):
    """timm features + torchvision FPN: (B, 3, H, W) -> ``OrderedDict`` of (B, out_channels, H / s, W / s),
    keys "0", "1", ... from fine to coarse (plus "pool" with ``LastLevelMaxPool``). Has ``out_channels``
    like torchvision's ``BackboneWithFPN``."""

    def __init__(self, features: TimmFeatures, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _normalized(module_name: str) -> str:
    """timm's ``features_only`` flattens top-level sequentials (``stages.0`` -> ``stages_0``): compare names
    with both separators the same."""
    return module_name.replace(".", "_")


def weights_file(path: str | Path) -> Path:
    """A weights file, or a ``convplus train`` run folder (then its ``best/model.safetensors``)."""
    path = Path(path)
    for candidate in (path / "best" / "model.safetensors", path / "model.safetensors"):
        if path.is_dir() and candidate.is_file():
            return candidate
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder without best/model.safetensors or model.safetensors")
    return path


def load_backbone_weights(features: nn.Module, path: str | Path) -> nn.Module:
    """Load a classification checkpoint into a timm ``features_only`` model, in place.

    ``path``: a ``convplus train`` run (its folder or a ``model.safetensors``) or a ConvNeXt (V2)
    checkpoint; a conv checkpoint loads exactly into Conv+ layers (kernel = the depthwise conv, attention
    gain 0), as ``load_pretrained`` does. Keys outside the backbone (classifier head, final norm) are
    dropped; a backbone key the file lacks, or a shape that differs, raises ``CheckpointError``.
    """
    path = weights_file(path)
    modules = {_normalized(name): name for name, _ in features.named_modules()}
    renamed = {}
    for key, value in read_state_dict(path).items():
        module, _, param = key.rpartition(".")
        target = modules.get(_normalized(module))
        if target is not None:
            renamed[f"{target}.{param}" if target else param] = value
    state, convplus_only = to_convplus_keys(features, renamed)
    own = features.state_dict()
    fresh = convplus_only - set(state)  # Conv+ parameters a conv checkpoint cannot provide
    missing = sorted(set(own) - set(state) - fresh)
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or shapes:
        problems = [
            f"missing backbone keys {missing[:8]} ({len(missing)} in all)" if missing else "",
            f"mismatched shapes {shapes[:5]}" if shapes else "",
        ]
        raise CheckpointError(f"{path}: does not fit this backbone: " + "; ".join(p for p in problems if p))
    features.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    with torch.no_grad():
        for name, module in features.named_modules():
            if isinstance(module, ConvPlus2d) and f"{name}.gain" in fresh:
                module.gain.zero_()  # a conv checkpoint: the layer starts as exactly that conv
    return features


def timm_fpn(
    model_name: str,
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    pretrained_file: str | Path | None = None,
    **timm_kwargs,
) -> TimmWithFPN:
    """``timm.create_model(model_name, features_only=True, **timm_kwargs)`` (weights from ``pretrained_file``)
    under a torchvision FPN with ``out_channels`` channels per level."""
    try:
        body = timm.create_model(model_name, pretrained=False, features_only=True, **timm_kwargs)
    except RuntimeError as error:  # timm: unknown model name, or no features_only support
        raise ValueError(f"backbone {model_name!r}: {error}") from error
    if pretrained_file is not None:
        load_backbone_weights(body, pretrained_file)
    return TimmWithFPN(TimmFeatures(body), out_channels, extra_blocks)
