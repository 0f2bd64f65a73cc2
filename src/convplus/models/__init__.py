"""timm integration: Conv+ ConvNeXt V2 models, exact conversion of ConvNeXt weights, export, detectors and
segmenters on timm backbones; byte-level language models and video networks with Conv+, attention or
convolution mixers."""

from . import language, registry, video
from .convert import convert, load_converted
from .detection import create_detector
from .export import export_onnx
from .fpn import load_backbone_weights
from .pretrained import CheckpointError, load_pretrained, read_state_dict
from .replace import replace_convplus
from .segmentation import create_segmenter

__all__ = [
    "CheckpointError",
    "convert",
    "create_detector",
    "create_segmenter",
    "export_onnx",
    "language",
    "load_backbone_weights",
    "load_converted",
    "load_pretrained",
    "read_state_dict",
    "registry",
    "replace_convplus",
    "video",
]
