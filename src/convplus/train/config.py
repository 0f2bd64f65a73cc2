"""The settings of one training run: a dataclass that the CLI flags and YAML files both fill."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

AMP_MODES = ("none", "bf16", "fp16")


def _number(value: Any) -> float:
    """``value`` as a number for range checks; NaN (fails every comparison) for anything else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


@dataclass
class TrainConfig:
    """Every setting of ``convplus train`` (the CLI flag is the field name with dashes)."""

    task: str = "classification"
    model: str = "convplus_convnextv2_atto"
    data: str = "digits"
    num_classes: int | None = None
    masks: bool = False
    img_size: int = 32
    seq_len: int = 256
    frames: int = 8
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 1
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float = 0.0
    amp: str = "none"
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    output: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    pretrained_file: str | None = None
    replace_convplus: bool = False
    convplus_stages: list[int] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    convplus_kwargs: dict[str, Any] = field(default_factory=dict)
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    quiet: bool = False

    HELP: ClassVar[dict[str, str]] = {
        "task": "classification | detection | segmentation | lm | video",
        "model": "any timm model name (convplus_convnextv2_* included); the backbone for detection / segmentation; "
        "lm: convplus_lm_* | transformer_lm_* | conv_lm_*; video: convplus_video_* | conv_video_*",
        "data": "classification: digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | synthetic:NAME; "
        "detection: coco:PATH | synthetic:shapes; segmentation: ade20k:PATH | synthetic:shapes; "
        "lm: text:PATH (a UTF-8 file or folder) | text:stdlib (this Python's standard library source); "
        "video: synthetic:moving-digits",
        "num_classes": "classes of an ade20k:PATH folder (default: 150 for ADE20K, else the largest label)",
        "masks": "detection: Mask R-CNN (boxes and instance masks) instead of Faster R-CNN",
        "amp": "none | bf16 | fp16 (fp16 on CUDA only)",
        "ema": "EMA decay of the weights (0 = off), evaluated alongside the model",
        "resume": "continue the run in --output from its last checkpoint",
        "overwrite": "replace a different run in --output",
        "replace_convplus": "replace ConvNeXt depthwise convs with Conv+ (exact from_conv unless --convplus-kwargs)",
        "convplus_stages": "stage indices to convert (default: all)",
        "model_kwargs": "JSON dict for timm.create_model, e.g. '{\"depths\": [1,1,1,1]}'",
        "convplus_kwargs": 'JSON dict of Conv+ settings for fresh layers, e.g. \'{"heads": 4, "window": null}\'',
        "img_size": "training resolution: the image side (classification, segmentation crops) or the shorter "
        "side (detection; the longer one capped at 1333/800 of it); video: the frame side",
        "seq_len": "lm: bytes per training sequence",
        "frames": "video: frames per clip",
        "max_train_samples": "use only the first N training images (quick runs)",
        "max_val_samples": "use only the first N validation images",
        "quiet": "no progress bars or per-epoch lines",
    }

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """The settings of a YAML mapping (keys are field names, with underscores or dashes)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from error
        if not isinstance(settings, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(settings).__name__}")
        settings = {str(key).replace("-", "_"): value for key, value in settings.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(
                f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**settings)

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag of the first setting that no run could use."""
        positive = ("img_size", "seq_len", "frames", "epochs", "batch_size", "lr")
        non_negative = ("weight_decay", "warmup_epochs", "mixup", "cutmix", "workers")
        fractions = ("drop_path", "label_smoothing", "ema")  # in [0, 1)
        problems = [(name, "a number > 0") for name in positive if not _number(getattr(self, name)) > 0]
        problems += [(name, "a number >= 0") for name in non_negative if not _number(getattr(self, name)) >= 0]
        problems += [(name, "a number in [0, 1)") for name in fractions if not 0 <= _number(getattr(self, name)) < 1]
        problems += [
            (name, "a number > 0 or unset")
            for name in ("max_train_samples", "max_val_samples")
            if getattr(self, name) is not None and not _number(getattr(self, name)) > 0
        ]
        if self.amp not in AMP_MODES:
            problems.append(("amp", " | ".join(AMP_MODES)))
        for name in ("model_kwargs", "convplus_kwargs"):
            if not isinstance(getattr(self, name), dict):
                problems.append((name, "a JSON object"))
        if problems:
            name, expected = problems[0]
            raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected {expected}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--img-size``, ``--replace-convplus``, ...), plus ``--config FILE``."""
    parser.add_argument("--config", help="YAML file of settings; flags given on the command line win")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = TrainConfig.HELP.get(f.name, "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name in ("model_kwargs", "convplus_kwargs"):
            parser.add_argument(flag, type=json.loads, default=None, help=help_text)
        elif f.name == "convplus_stages":
            parser.add_argument(flag, type=int, nargs="+", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=None, help=help_text or f"(default {f.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of a YAML file (if any), overridden by the flags that were given."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(config, **given)
