"""Conv+: one primitive that generalizes convolution and self-attention.

``ConvPlus1d/2d/3d`` are the layers, ``conv_plus`` the functional form; see docs/definition.md for the definition.
"""

from . import models  # registers the convplus_convnextv2_* models with timm
from .functional import conv_plus
from .modules import ConvPlus1d, ConvPlus2d, ConvPlus3d

__all__ = ["ConvPlus1d", "ConvPlus2d", "ConvPlus3d", "conv_plus", "models"]
