"""The 'cpu' backend: the windowed attention term in one fused C++ kernel (OpenMP over rows, vectorised
over the contiguous width), forward and backward; compiled with the system's C++ compiler on first use
(``torch.utils.cpp_extension``, cached afterwards).

It computes what the 'local' backend computes. Under ``torch.compile`` / ``torch.export`` (which cannot
trace into the kernel) and for dtypes other than float32/float64 it runs the 'local' PyTorch loop instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from ..neighborhood import reachable_halves, window_offsets
from . import local

SOURCE = Path(__file__).with_name("csrc") / "local_attention.cpp"
KERNEL_DTYPES = (torch.float32, torch.float64)


@functools.cache
def extension() -> ModuleType:
    """The compiled kernel module (built on first call; raises if no C++ toolchain can build it)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="convplus_local_cpu",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used on this machine, or None if it builds and loads."""
    try:
        extension()
    except Exception as error:  # any build or load failure: report it, the 'local' backend still works
        return f"the C++ kernel could not be built ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


class _WindowedAttention(torch.autograd.Function):
    """q, k (BK, Dq, T, H, X), v (BK, D, T, H, X), offsets (W, 3) -> (BK, D, T, H, X)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets):
        out, probs = extension().forward(q, k, v, offsets)
        ctx.save_for_backward(q, k, v, probs, offsets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, offsets = ctx.saved_tensors
        dq, dk, dv = extension().backward(q, k, v, probs, grad_out.contiguous(), offsets)
        return dq, dk, dv, None


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(B, K, C, *S) with 1 <= len(S) <= 3 -> contiguous (B*K, C, T, H, X)."""
    spatial = t.shape[3:]
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], *([1] * (3 - len(spatial))), *spatial).contiguous()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, ...] | None, dilation: tuple[int, ...]
) -> torch.Tensor:
    """sum_{j in N(i)} A(i, j) V_j: q, k (B, K, Dq, *S), v (B, K, D, *S) -> (B, K, D, *S)."""
    if torch.compiler.is_compiling() or v.dtype not in KERNEL_DTYPES or q.dtype != v.dtype:
        return local.attend(q, k, v, window, dilation)
    spatial = tuple(v.shape[3:])
    offsets = window_offsets(reachable_halves(spatial, window, dilation), dilation)
    padded = [(0,) * (3 - len(spatial)) + o for o in offsets]
    out = _WindowedAttention.apply(_as_3d(q), _as_3d(k), _as_3d(v), torch.tensor(padded, dtype=torch.int64))
    return out.view(v.shape)
