"""``convplus convert``: a ConvNeXt V2 checkpoint file -> a Conv+ model folder (safetensors + config.json).

The folder is written under a temporary name and renamed when complete, so a failed conversion leaves
nothing half-written. The conversion is checked: the Conv+ model's logits on a random batch must equal the
plain model's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from .pretrained import load_pretrained
from .registry import SIZES, STAGE_CONFIGS

PLAIN = tuple(f"convnextv2_{size}" for size in SIZES)


def convert(
    model_name: str, checkpoint: str | Path, output: str | Path, num_classes: int | None = None, overwrite: bool = False
) -> float:
    """Convert ``checkpoint`` of timm ``model_name`` to ``convplus_<model_name>`` in folder ``output``.

    Returns the max abs difference of the two models' logits on a random 1x3x64x64 batch.
    """
    if model_name not in PLAIN:
        raise ValueError(f"--model must be one of {', '.join(PLAIN)}, got {model_name!r}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output}: output folder exists and is not empty (use --overwrite)")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    plain = load_pretrained(timm.create_model(model_name, **kwargs), checkpoint, strict_head=True).eval()
    kwargs["num_classes"] = plain.num_classes
    arch = f"convplus_{model_name}"
    converted = load_pretrained(timm.create_model(arch, **kwargs), checkpoint, strict_head=True).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        diff = (converted(x) - plain(x)).abs().max().item()
    config = {
        "architecture": arch,
        "base_model": model_name,
        "num_classes": plain.num_classes,
        "source_checkpoint": str(checkpoint),
        "convplus_stage_configs": list(STAGE_CONFIGS),
        "max_abs_logit_difference": diff,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_file({k: v.contiguous() for k, v in converted.state_dict().items()}, staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return diff


def load_converted(folder: str | Path) -> torch.nn.Module:
    """The model saved by ``convert`` in ``folder`` (config.json + model.safetensors)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a ConvNeXt V2 checkpoint file to a Conv+ model folder", description=__doc__
    )
    parser.add_argument("--model", required=True, help=f"the checkpoint's architecture: {', '.join(PLAIN)}")
    parser.add_argument("--checkpoint", required=True, help="local .safetensors or .pth file")
    parser.add_argument("--output", required=True, help="folder to write (model.safetensors + config.json)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    diff = convert(args.model, args.checkpoint, args.output, args.num_classes, args.overwrite)
    print(f"wrote {args.output} (model.safetensors, config.json); max |logit difference| vs plain: {diff:.2e}")
    return 0
