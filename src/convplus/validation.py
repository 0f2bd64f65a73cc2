"""Argument checks shared by the functional op and the modules (docs/definition.md, 'Errors').

Every check raises before any compute, naming the argument, the value given and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCORES = ("direct", "qk")
POSITIONAL = ("sincos", "learned", "none")


def as_tuple(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """``value`` as an ``n``-tuple of ints (an int is repeated), or a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    if (
        isinstance(value, torch.Size | Sequence)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")


def odd_sizes(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """``value`` as an ``n``-tuple of odd positive ints (kernel sizes, windows)."""
    sizes = as_tuple(name, value, n)
    if any(s <= 0 or s % 2 == 0 for s in sizes):
        raise ValueError(f"{name} must be odd and positive in every dim, got {value!r}")
    return sizes


def positive_sizes(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    sizes = as_tuple(name, value, n)
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{name} must be positive in every dim, got {value!r}")
    return sizes


def bool_flags(name: str, value: bool | Sequence[bool], n: int) -> tuple[bool, ...]:
    """``value`` as an ``n``-tuple of bools (a bool is repeated), or a ValueError naming ``name``."""
    if isinstance(value, bool):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be a bool or a sequence of {n} bools (one per spatial dim), got {value!r}")


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def one_of(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_input(x: torch.Tensor, spatial_dims: int, channels: int | None) -> None:
    """``x`` must be a floating tensor of shape (B, channels, *S) with ``spatial_dims`` spatial dims
    (any channel count when ``channels`` is None)."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            "Conv+ cannot be traced through by torch.fx (its backend is chosen from the input's device and "
            "shape): trace with the Conv+ layers as leaf modules, i.e. tracer leaf_modules="
            "timm.models.get_notrace_modules(), as timm.models.create_feature_extractor and timm's FX feature "
            "extraction do"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {x.dtype}")
    if x.dim() != spatial_dims + 2:
        raise ValueError(
            f"input must have shape (B, C, {', '.join('S' + str(i) for i in range(spatial_dims))}) "
            f"({spatial_dims + 2} dims), got shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"input must have {channels} channels (dim 1), got shape {tuple(x.shape)}")
