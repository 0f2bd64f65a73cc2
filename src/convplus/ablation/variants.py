"""The compared models: one small ConvNeXt V2 backbone, its depthwise mixers swapped per variant.

Backbone: depths (1, 1, 2, 1), widths (16, 32, 64, 128); a 32x32 image gives 8x8, 4x4, 2x2 and 1x1 stage
grids. A 7x7 window is therefore local only in stage 0 and already covers the grid in stages 1-3: the local
Conv+ variant is "local early, global in the last stages", and the global variant differs from it in
stage 0. Parameter counts match within 5%: attention-only variants drop the 7x7 kernels (49 C per block) and
use 'qk' scores with qk_dim 6 (48 C + 48 per block) instead, i.e. standard query/key attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKBONE: dict[str, Any] = {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128]}
ATTENTION_ONLY = {"convolution": False, "score": "qk", "qk_dim": 6, "heads": 4}


@dataclass(frozen=True)
class Variant:
    """One compared model: how the trainer builds it (TrainConfig fields)."""

    name: str
    description: str
    model: str = "convnextv2_atto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    replace_convplus: bool = False
    convplus_kwargs: dict[str, Any] = field(default_factory=dict)
    finetune_from: str | None = None  # train this variant first, then convert exactly and fine-tune


VARIANTS: tuple[Variant, ...] = (
    Variant("conv", "plain ConvNeXt V2 blocks (7x7 depthwise conv)"),
    Variant(
        "attention-local",
        "Conv+ without its conv term: 7x7-window attention",
        replace_convplus=True,
        convplus_kwargs={**ATTENTION_ONLY, "window": 7},
    ),
    Variant(
        "attention-global",
        "Conv+ without its conv term: global attention",
        replace_convplus=True,
        convplus_kwargs={**ATTENTION_ONLY, "window": None},
    ),
    Variant(
        "convplus-local",
        "Conv+ (learned blend), 7x7 window: local in stage 0, covering the grid (global) in stages 1-3",
        replace_convplus=True,
        convplus_kwargs={"heads": 4, "window": 7},
    ),
    Variant(
        "convplus-global",
        "Conv+ (learned blend), global attention in every stage",
        model="convplus_convnextv2_atto",
        model_kwargs={"global_stages": [0, 1, 2, 3]},
    ),
    Variant(
        "conv-to-convplus",
        "the conv model, converted exactly to Conv+ (g = 0), then fine-tuned",
        replace_convplus=True,
        finetune_from="conv",
    ),
)
