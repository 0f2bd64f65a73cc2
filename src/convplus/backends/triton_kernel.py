"""The windowed attention term as Triton kernels (GPU): one pass over the window with an online softmax
forward, and a backward that recomputes the probabilities from the saved log-sum-exp.

Layout: q, k (BK, Dq, N), v (BK, D, N), N = T * H * X (n-d grids padded to 3 dims); offsets (W, 3) int64.
Each program handles BLOCK_N positions of one (batch, head). Accumulation is float32 for every input dtype.
Importing this module imports triton; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32


@triton.jit
def _coords(n, H, X):
    return n // (H * X), (n // X) % H, n % X


@triton.jit
def _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X):
    """Whether position (t, y, x) + offset w is a valid key, and its flat index."""
    tt = t + tl.load(off_ptr + 3 * w)
    yy = y + tl.load(off_ptr + 3 * w + 1)
    xx = x + tl.load(off_ptr + 3 * w + 2)
    ok = n_ok & (tt >= 0) & (tt < T) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < X)
    return ok, (tt * H + yy) * X + xx


@triton.jit
def _forward(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    out_ptr,
    lse_ptr,
    W,
    T,
    H,
    X,
    N,
    DQ,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bk = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    t, y, x = _coords(n, H, X)
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + bk * DQ * N + dq[None, :] * N + n[:, None], mask=n_ok[:, None] & (dq[None, :] < DQ), other=0.0
    ).to(tl.float32)
    m = tl.full((BLOCK_N,), -1e30, tl.float32)
    denom = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for w in range(W):
        ok, j = _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X)
        k = tl.load(
            k_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], mask=ok[:, None] & (dq[None, :] < DQ), other=0.0
        ).to(tl.float32)
        s = tl.where(ok, tl.sum(q * k, axis=1), -1e30)
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(s - m_new), 0.0)
        v = tl.load(
            v_ptr + bk * D * N + dv[None, :] * N + j[:, None], mask=ok[:, None] & (dv[None, :] < D), other=0.0
        ).to(tl.float32)
        denom = denom * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    denom = tl.where(n_ok, denom, 1.0)
    out = acc / denom[:, None]
    tl.store(
        out_ptr + bk * D * N + dv[None, :] * N + n[:, None],
        out.to(out_ptr.dtype.element_ty),
        mask=n_ok[:, None] & (dv[None, :] < D),
    )
    tl.store(lse_ptr + bk * N + n, m + tl.log(denom), mask=n_ok)


@triton.jit
def _backward(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    lse_ptr,
    delta_ptr,
    gout_ptr,
    gq_ptr,
    gk_ptr,
    gv_ptr,
    W,
    T,
    H,
    X,
    N,
    DQ,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bk = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    t, y, x = _coords(n, H, X)
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_D)
    q_mask = n_ok[:, None] & (dq[None, :] < DQ)
    v_mask = n_ok[:, None] & (dv[None, :] < D)
    q = tl.load(q_ptr + bk * DQ * N + dq[None, :] * N + n[:, None], mask=q_mask, other=0.0).to(tl.float32)
    g = tl.load(gout_ptr + bk * D * N + dv[None, :] * N + n[:, None], mask=v_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bk * N + n, mask=n_ok, other=0.0)
    delta = tl.load(delta_ptr + bk * N + n, mask=n_ok, other=0.0)
    grad_q = tl.zeros((BLOCK_N, BLOCK_DQ), tl.float32)
    for w in range(W):
        ok, j = _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X)
        k_mask = ok[:, None] & (dq[None, :] < DQ)
        w_mask = ok[:, None] & (dv[None, :] < D)
        k = tl.load(k_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bk * D * N + dv[None, :] * N + j[:, None], mask=w_mask, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        ds = p * (tl.sum(g * v, axis=1) - delta)
        grad_q += ds[:, None] * k
        tl.atomic_add(gk_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], ds[:, None] * q, mask=k_mask)
        tl.atomic_add(gv_ptr + bk * D * N + dv[None, :] * N + j[:, None], p[:, None] * g, mask=w_mask)
    tl.store(gq_ptr + bk * DQ * N + dq[None, :] * N + n[:, None], grad_q, mask=q_mask)


def _launch_shape(q: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int]) -> dict:
    bk, dq, n = q.shape
    return {
        "grid": (bk, triton.cdiv(n, BLOCK_N)),
        "T": grid[0],
        "H": grid[1],
        "X": grid[2],
        "N": n,
        "DQ": dq,
        "D": v.shape[1],
        "BLOCK_DQ": triton.next_power_of_2(dq),
        "BLOCK_D": triton.next_power_of_2(v.shape[1]),
    }


class WindowedAttention(torch.autograd.Function):
    """q, k (BK, Dq, N), v (BK, D, N), offsets (W, 3), grid (T, H, X) -> (BK, D, N)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, grid):
        s = _launch_shape(q, v, grid)
        out = torch.empty_like(v)
        lse = torch.empty(q.shape[0], s["N"], device=q.device, dtype=torch.float32)
        _forward[s["grid"]](
            q,
            k,
            v,
            offsets,
            out,
            lse,
            offsets.shape[0],
            s["T"],
            s["H"],
            s["X"],
            s["N"],
            s["DQ"],
            s["D"],
            BLOCK_N=BLOCK_N,
            BLOCK_DQ=s["BLOCK_DQ"],
            BLOCK_D=s["BLOCK_D"],
        )
        ctx.save_for_backward(q, k, v, offsets, out, lse)
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, out, lse = ctx.saved_tensors
        s = _launch_shape(q, v, ctx.grid)
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(1).contiguous()  # (BK, N)
        grad_q = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        grad_k = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        grad_v = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        _backward[s["grid"]](
            q,
            k,
            v,
            offsets,
            lse,
            delta,
            grad_out,
            grad_q,
            grad_k,
            grad_v,
            offsets.shape[0],
            s["T"],
            s["H"],
            s["X"],
            s["N"],
            s["DQ"],
            s["D"],
            BLOCK_N=BLOCK_N,
            BLOCK_DQ=s["BLOCK_DQ"],
            BLOCK_D=s["BLOCK_D"],
        )
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None
