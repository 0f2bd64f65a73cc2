"""Run checkpoints for exact resume, written atomically.

A checkpoint is a folder (``last/`` or ``best/``) with ``model.safetensors``, ``ema.safetensors`` (if EMA is
on) and ``state.pt`` (optimizer, scheduler, epoch, best metric, RNG states). It is written as ``<name>.tmp``
and swapped in by renames, so a crash at any moment leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(folder: Path, model: nn.Module, ema: nn.Module | None, state: dict[str, Any]) -> None:
    """Write the checkpoint folder ``folder`` atomically (see the module docstring)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_weights(model), tmp / "model.safetensors")
    if ema is not None:
        save_file(_weights(ema), tmp / "ema.safetensors")
    torch.save(state, tmp / "state.pt")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder`` (or its ``.old`` copy if a crash hit between the two renames)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "state.pt").is_file():
            return candidate
    return None


def load(folder: Path, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
    """Load weights into ``model`` (and ``ema``); return the saved state dict (optimizer, epoch, RNG, ...)."""
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
        if ema is not None and (folder / "ema.safetensors").is_file():
            ema.load_state_dict(load_file(folder / "ema.safetensors"))
    except RuntimeError as error:
        raise ValueError(f"{folder}: checkpoint does not fit this model ({str(error).splitlines()[0]})") from error
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
