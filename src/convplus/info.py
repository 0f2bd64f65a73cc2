"""``convplus info``: the versions, devices and backends of this installation, to paste into a bug report (as
``python -m torch.utils.collect_env``).

For every device it lists each backend and whether it runs there, or why not, and what ``backend='auto'``
picks there for a windowed layer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from . import backends
from .backends import cpu
from .neighborhood import Neighborhood

PACKAGES = ("convplus", "torch", "torchvision", "timm", "triton")
"""The packages whose versions are reported."""


def package_version(name: str) -> str:
    """The installed version of ``name``, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else its architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def devices() -> list[torch.device]:
    """The CPU and every CUDA device torch sees."""
    return [torch.device("cpu"), *(torch.device("cuda", i) for i in range(torch.cuda.device_count()))]


def backend_status(name: str, device: torch.device) -> str:
    """'runs' or 'cannot run: <why>' for backend ``name`` on ``device``; for 'cpu', where its kernel comes from."""
    reason = backends.BACKENDS[name].unavailable_reason(device)
    if reason is not None:
        return f"cannot run: {reason}"
    if name == "cpu":
        kernel = cpu.extension()
        how = "compiled at install time" if kernel.__name__ == cpu.cpu_build.MODULE else "built just in time"
        return f"runs ({how}: {kernel.__file__})"
    return "runs"


def report() -> list[str]:
    """The lines ``convplus info`` prints."""
    lines = [f"python: {sys.version.split()[0]} ({sys.executable})"]
    lines += [f"{name}: {package_version(name)}" for name in PACKAGES]
    lines.append(f"convplus imported from: {Path(__file__).parent}")
    lines.append(f"torch build: CUDA {torch.version.cuda or 'none'}, debug={torch.version.debug}")
    lines.append(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"CUDA device {index}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB"
            )
    else:
        lines.append("CUDA: no device available")
    for device in devices():
        lines.append(f"backends on {device}:")
        lines += [f"  {name:10s} {backend_status(name, device)}" for name in backends.BACKENDS]
        with warnings.catch_warnings():  # the fallback, if any, is listed above
            warnings.simplefilter("ignore", backends.BackendFallbackWarning)
            picked = backends.select((64, 64), device, Neighborhood.of((7, 7), (1, 1)))
        lines.append(f"  'auto' picks {picked!r} for a 7x7 window on a 64x64 grid")
    return lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, devices and which backends run here", description=__doc__.splitlines()[0]
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("\n".join(report()))
    return 0
