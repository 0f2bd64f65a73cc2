"""How the fused C++ CPU kernel is compiled: its sources and flags, shared by the package build (``setup.py``,
which compiles it into ``convplus.backends._cpu_kernels`` at install time) and the just-in-time fallback of the
'cpu' backend (``torch.utils.cpp_extension.load``, for a source checkout that was never built).

Imports nothing but the standard library, so that ``setup.py`` can read it without importing convplus.
"""

from __future__ import annotations

from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
"""The kernel's C++ sources (*.cpp) and headers (*.h)."""

MODULE = "convplus.backends._cpu_kernels"
"""The compiled module an installed package carries."""

JIT_NAME = "convplus_cpu_kernels"
"""The module name of the just-in-time build (cached under TORCH_EXTENSIONS_DIR)."""

EXTRA_CFLAGS = ("-O3", "-march=native", "-fopenmp")
EXTRA_LDFLAGS = ("-fopenmp",)
"""Tuples: torch.utils.cpp_extension appends to the lists it is given, so each build gets fresh copies."""


def sources() -> list[Path]:
    """Every C++ source of the kernel, sorted."""
    return sorted(CSRC.glob("*.cpp"))


def headers() -> list[Path]:
    """Every header of the kernel, sorted (a change to one rebuilds the kernel)."""
    return sorted(CSRC.glob("*.h"))
