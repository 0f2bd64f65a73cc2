"""Loading ConvNeXt (V2) weights from a local file into a plain or a Conv+ model.

Files are what users download from the Hub: timm's ``model.safetensors`` or a ``.pth``/``.bin`` state
dict (possibly wrapped as ``{"model": ...}`` or ``{"state_dict": ...}``). Into a Conv+ model, each block's
``conv_dw.weight`` becomes the Conv+ kernel and the attention gains are set to 0, so the model computes
exactly what the checkpoint's ConvNeXt did; the Conv+-only parameters (gains, temperatures, learned
positions) keep their initialisation otherwise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..modules import ConvPlus2d


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for this model; the message names the file and the problem."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch checkpoint file, unwrapped from a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure means: not a readable checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_convplus_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Rename ``<conv_dw>.weight`` to ``<conv_dw>.kernel`` for every Conv+ layer; also returns the Conv+-only
    parameter names the file cannot provide."""
    state = dict(state)
    extra: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, ConvPlus2d):
            continue
        if module.proj or module.kernel is None:
            raise CheckpointError(
                f"Conv+ layer {name} has proj={module.proj}, convolution={module.kernel is not None}: a conv "
                "checkpoint maps exactly only onto proj=False layers with a convolution term"
            )
        weight = state.pop(f"{name}.weight", None)
        if weight is not None:
            state[f"{name}.kernel"] = (
                weight.reshape(module.kernel.shape) if weight.numel() == module.kernel.numel() else weight
            )
        extra |= {f"{name}.{p}" for p, _ in module.named_parameters() if p not in ("kernel", "bias")}
    return state, extra


def load_pretrained(model: nn.Module, path: str | Path, strict_head: bool = False) -> nn.Module:
    """Load a ConvNeXt (V2) checkpoint file into ``model`` (plain or Conv+), in place; returns the model.

    A classifier head of another size (fine-tuning to new classes) is skipped with a warning unless
    ``strict_head``; any other missing, unexpected or mis-shaped key raises ``CheckpointError``.
    """
    state, convplus_only = to_convplus_keys(model, read_state_dict(path))
    own = model.state_dict()
    head = [k for k in state if k.startswith("head.fc.") and k in own and own[k].shape != state[k].shape]
    if head and not strict_head:
        warnings.warn(f"{path}: classifier head {head} has another shape; keeping the model's own", stacklevel=2)
        for key in head:
            state.pop(key)
    shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state) - convplus_only - set(head))
    unexpected = sorted(set(state) - set(own))
    if shape or missing or unexpected:
        problems = [
            f"mismatched shapes {shape[:5]}" if shape else "",
            f"missing keys {missing[:5]}" if missing else "",
            f"unexpected keys {unexpected[:5]}" if unexpected else "",
        ]
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(p for p in problems if p))
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ConvPlus2d) and module.gain is not None and f"{name}.gain" not in state:
                module.gain.zero_()  # a conv checkpoint: the layer starts as exactly that conv
    return model
