"""timm integration: Conv+ ConvNeXt V2 models, exact conversion of ConvNeXt weights, export."""

from . import registry
from .convert import convert, load_converted
from .export import export_onnx
from .pretrained import CheckpointError, load_pretrained, read_state_dict
from .replace import replace_convplus

__all__ = [
    "CheckpointError",
    "convert",
    "export_onnx",
    "load_converted",
    "load_pretrained",
    "read_state_dict",
    "registry",
    "replace_convplus",
]
