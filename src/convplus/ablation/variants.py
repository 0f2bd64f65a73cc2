"""The compared models: one backbone (``backbones.py``), its depthwise mixers swapped per variant.

Every variant keeps the backbone's blocks and widths; only the mixer changes, at matched parameters:

- ``conv``: the plain depthwise conv.
- ``attention-local`` / ``attention-global``: Conv+ without its conv term, 'qk' scores with qk_dim chosen so
  that the query/key weights (2 K qk_dim C) replace the conv's k^2 C weights: standard query/key attention.
- ``convplus-local`` / ``convplus-global``: Conv+ trained from scratch, both terms on, learned blend,
  'direct' scores starting at temperature 1 (at the layer's default 10 the global map starts sharp and
  near-local, and Conv+ did not learn the long-range task within the budget).
- ``conv-to-convplus``: the same seed's trained ``conv`` model converted exactly (gains 0, global window)
  and fine-tuned for as many epochs as the others train.
- ``fixed-blend``: ``convplus-global`` with its gains frozen at their initial 1: does learning the blend matter?
- ``seed-sketch``: ``SeedSketch2d``, one shared global map, no conv term, one depthwise projection per tap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backbones import BACKBONES


@dataclass(frozen=True)
class Variant:
    """One compared model: how ``convplus_ablation`` builds it, and how the trainer converts it."""

    name: str
    description: str
    mixer: str = "conv"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    frozen_gain: bool = False
    finetune_from: str | None = None  # start from this variant's trained weights, converted exactly
    convert_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> str:
        """'local', 'global' or '—' (no attention)."""
        if self.mixer == "sketch" or (self.finetune_from and self.convert_kwargs.get("window", 0) is None):
            return "global"
        if self.mixer != "convplus":
            return "—"
        return "global" if self.mixer_kwargs.get("window", 0) is None else "local"


def kernel_size(backbone: str) -> int:
    settings = BACKBONES[backbone]
    return settings.get("kernel_size", settings.get("kernel_sizes"))


def variants(backbone: str, heads: int = 1) -> tuple[Variant, ...]:
    """The eight variants on ``backbone`` (Conv+ with ``heads`` heads)."""
    k = kernel_size(backbone)
    attention_only = {"heads": heads, "convolution": False, "score": "qk", "qk_dim": max(1, round(k * k / (2 * heads)))}
    convplus = {"heads": heads, "temperature": 1.0}  # as the converted layers start (see study.py)
    return (
        Variant("conv", f"{k}x{k} depthwise conv (the plain backbone)"),
        Variant(
            "attention-local", f"{k}x{k}-window attention, no conv term", "convplus", {**attention_only, "window": k}
        ),
        Variant("attention-global", "global attention, no conv term", "convplus", {**attention_only, "window": None}),
        Variant("convplus-local", f"Conv+, {k}x{k} window, learned blend", "convplus", {**convplus, "window": k}),
        Variant("convplus-global", "Conv+, global window, learned blend", "convplus", {**convplus, "window": None}),
        Variant(
            "conv-to-convplus",
            "the trained conv model converted exactly (gains 0, global window), then fine-tuned",
            finetune_from="conv",
            convert_kwargs={"heads": heads, "window": None},
        ),
        Variant(
            "fixed-blend",
            "Conv+, global window, gains frozen at 1",
            "convplus",
            {**convplus, "window": None},
            frozen_gain=True,
        ),
        Variant("seed-sketch", "the seed sketch: one shared global softmax map, no conv term", "sketch"),
    )


VARIANT_NAMES = tuple(v.name for v in variants("isotropic"))
