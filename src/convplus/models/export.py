"""Export of Conv+ models for deployment: ONNX through ``torch.export`` (``torch.onnx.export(dynamo=True)``),
to run in onnxruntime. Windowed layers with ``backend='auto'`` export as the 'gathered' formulation (tiles of
dense attention with a constant neighborhood bias: gathers, batched matrix products, softmax), which
onnxruntime runs as plain operators."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: tuple[int, ...] = (1, 3, 224, 224), opset: int = 18
) -> Path:
    """Write ``model`` (eval mode) as ONNX to ``path`` for inputs of ``input_shape``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(input_shape)
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    return path
