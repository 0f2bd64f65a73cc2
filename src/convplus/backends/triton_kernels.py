"""The windowed Conv+ mixing step as Triton kernels (GPU): the attention term (online softmax), its gain and
the depthwise convolution term in one pass over the window,

    z_i = g * sum_w P_w(i) v_{i + o_w} + sum_w r(o_w) v_{i + o_w},

and a backward that recomputes the probabilities from the saved log-sum-exp.

Layout: q, k (BK, Dq, N), v (BK, D, N), N = T * H * X (n-d grids padded to 3 dims); offsets (W, 3) int64,
every offset some position's window uses; bounds (T + H + X, 2) int64, per coordinate of each dim the first
and last offset of its window (``fused_window.FusedWindow``); gain (K,) and taps r (K, D, W) float32 for
head bk % K. Each program handles BLOCK_N positions of one (batch, head). Accumulation is float32 for every
input dtype. Importing this module imports triton; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors
(tests).
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
def _window_bounds(bounds_ptr, t, y, x, n_ok, T, H):
    """The first and last offset of the window of each of the positions' coordinates: six (BLOCK_N,) vectors."""
    lo_t = tl.load(bounds_ptr + 2 * t, mask=n_ok, other=0)
    hi_t = tl.load(bounds_ptr + 2 * t + 1, mask=n_ok, other=0)
    lo_y = tl.load(bounds_ptr + 2 * (T + y), mask=n_ok, other=0)
    hi_y = tl.load(bounds_ptr + 2 * (T + y) + 1, mask=n_ok, other=0)
    lo_x = tl.load(bounds_ptr + 2 * (T + H + x), mask=n_ok, other=0)
    hi_x = tl.load(bounds_ptr + 2 * (T + H + x) + 1, mask=n_ok, other=0)
    return lo_t, hi_t, lo_y, hi_y, lo_x, hi_x


@triton.jit
def _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x):
    """For position (t, y, x) and offset w: whether the key lies in the grid (the convolution term reads it),
    whether it lies in the position's window N(i) (the attention reads it), and its flat index."""
    ot = tl.load(off_ptr + 3 * w)
    oy = tl.load(off_ptr + 3 * w + 1)
    ox = tl.load(off_ptr + 3 * w + 2)
    tt, yy, xx = t + ot, y + oy, x + ox
    in_grid = n_ok & (tt >= 0) & (tt < T) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < X)
    in_window = (ot >= lo_t) & (ot <= hi_t) & (oy >= lo_y) & (oy <= hi_y) & (ox >= lo_x) & (ox <= hi_x)
    return in_grid, in_grid & in_window, (tt * H + yy) * X + xx


@triton.jit
def _forward(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    bounds_ptr,
    gain_ptr,
    taps_ptr,
    out_ptr,
    attn_ptr,
    lse_ptr,
    W,
    T,
    H,
    X,
    N,
    K,
    DQ,
    D,
    HAS_TAPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bk = tl.program_id(0)
    head = bk % K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    t, y, x = _coords(n, H, X)
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_D)
    conv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    q = tl.load(
        q_ptr + bk * DQ * N + dq[None, :] * N + n[:, None], mask=n_ok[:, None] & (dq[None, :] < DQ), other=0.0
    ).to(tl.float32)
    m = tl.full((BLOCK_N,), -1e30, tl.float32)
    denom = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo_t, hi_t, lo_y, hi_y, lo_x, hi_x = _window_bounds(bounds_ptr, t, y, x, n_ok, T, H)
    for w in range(W):
        in_grid, ok, j = _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x)
        k = tl.load(
            k_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], mask=ok[:, None] & (dq[None, :] < DQ), other=0.0
        ).to(tl.float32)
        s = tl.where(ok, tl.sum(q * k, axis=1), -1e30)
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(s - m_new), 0.0)
        v = tl.load(
            v_ptr + bk * D * N + dv[None, :] * N + j[:, None], mask=in_grid[:, None] & (dv[None, :] < D), other=0.0
        ).to(tl.float32)
        denom = denom * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
        if HAS_TAPS:
            tap = tl.load(taps_ptr + (head * D + dv) * W + w, mask=dv < D, other=0.0)
            conv += tap[None, :] * v
    denom = tl.where(n_ok, denom, 1.0)
    attn = acc / denom[:, None]
    out = tl.load(gain_ptr + head) * attn + conv
    out_mask = n_ok[:, None] & (dv[None, :] < D)
    tl.store(out_ptr + bk * D * N + dv[None, :] * N + n[:, None], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(attn_ptr + bk * D * N + dv[None, :] * N + n[:, None], attn, mask=out_mask)
    tl.store(lse_ptr + bk * N + n, m + tl.log(denom), mask=n_ok)


@triton.jit
def _backward(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    bounds_ptr,
    gain_ptr,
    taps_ptr,
    lse_ptr,
    delta_ptr,
    gout_ptr,
    gq_ptr,
    gk_ptr,
    gv_ptr,
    gtaps_ptr,
    W,
    T,
    H,
    X,
    N,
    K,
    DQ,
    D,
    HAS_TAPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta (BK, N) = sum_d gout * attention term; gtaps (BK, n_blocks, D, W) gets each block's partial
    sum_i gout_i v_{i + o_w} (reduced outside)."""
    bk = tl.program_id(0)
    head = bk % K
    gain = tl.load(gain_ptr + head)
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
    lo_t, hi_t, lo_y, hi_y, lo_x, hi_x = _window_bounds(bounds_ptr, t, y, x, n_ok, T, H)
    for w in range(W):
        in_grid, ok, j = _neighbor(off_ptr, w, t, y, x, n_ok, T, H, X, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x)
        k_mask = ok[:, None] & (dq[None, :] < DQ)
        w_mask = in_grid[:, None] & (dv[None, :] < D)
        k = tl.load(k_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bk * D * N + dv[None, :] * N + j[:, None], mask=w_mask, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        ds = gain * p * (tl.sum(g * v, axis=1) - delta)
        grad_q += ds[:, None] * k
        tl.atomic_add(gk_ptr + bk * DQ * N + dq[None, :] * N + j[:, None], ds[:, None] * q, mask=k_mask)
        weight = gain * p[:, None]
        if HAS_TAPS:
            weight += tl.load(taps_ptr + (head * D + dv) * W + w, mask=dv < D, other=0.0)[None, :]
            part = tl.sum(g * v, axis=0)
            block = (bk * tl.num_programs(1) + tl.program_id(1)) * D * W
            tl.store(gtaps_ptr + block + dv * W + w, part, mask=dv < D)
        tl.atomic_add(gv_ptr + bk * D * N + dv[None, :] * N + j[:, None], weight * g, mask=w_mask)
    tl.store(gq_ptr + bk * DQ * N + dq[None, :] * N + n[:, None], grad_q, mask=q_mask)


def _launch_shape(q: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], heads: int) -> dict:
    bk, dq, n = q.shape
    return {
        "grid": (bk, triton.cdiv(n, BLOCK_N)),
        "T": grid[0],
        "H": grid[1],
        "X": grid[2],
        "N": n,
        "K": heads,
        "DQ": dq,
        "D": v.shape[1],
        "BLOCK_N": BLOCK_N,
        "BLOCK_DQ": triton.next_power_of_2(dq),
        "BLOCK_D": triton.next_power_of_2(v.shape[1]),
    }


# The kernels as torch.library custom ops (kept whole by torch.compile / torch.export, differentiated through the
# backward op). Layout as in the module docstring; taps None: no convolution term in the pass.


@torch.library.custom_op("convplus::triton_window_mix", mutates_args=())
def window_mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    taps: torch.Tensor | None,
    offsets: torch.Tensor,
    bounds: torch.Tensor,
    grid: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (BK, D, N) in v's dtype, and for backward the attention term (BK, D, N) and the log-sum-exp of the
    scores (BK, N), both float32."""
    s = _launch_shape(q, v, grid, gain.shape[0])
    gain32 = gain.float().contiguous()
    taps32 = gain32 if taps is None else taps.float().contiguous()  # a placeholder pointer without taps
    out = torch.empty_like(v)
    attn = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    lse = torch.empty(q.shape[0], s["N"], device=q.device, dtype=torch.float32)
    grid_size = s.pop("grid")
    _forward[grid_size](
        q, k, v, offsets, bounds, gain32, taps32, out, attn, lse, offsets.shape[0], **s, HAS_TAPS=taps is not None
    )
    return out, attn, lse


@torch.library.custom_op("convplus::triton_window_mix_backward", mutates_args=())
def window_mix_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    taps: torch.Tensor | None,
    offsets: torch.Tensor,
    bounds: torch.Tensor,
    grid: list[int],
    attn: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v, gain and taps (in their dtypes; (0,) without taps) from grad_out (BK, D, N)."""
    s = _launch_shape(q, v, grid, gain.shape[0])
    width, heads = offsets.shape[0], gain.shape[0]
    gain32 = gain.float().contiguous()
    taps32 = gain32 if taps is None else taps.float().contiguous()
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * attn).sum(1).contiguous()  # (BK, N): sum_d gout * attention term
    grad_gain = delta.view(-1, heads, delta.shape[1]).sum((0, 2))
    grad_q = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    grad_k = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    grad_v = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    grid_size = s.pop("grid")
    blocks = 0 if taps is None else grid_size[1]
    grad_taps = torch.zeros(q.shape[0], blocks, s["D"], width, device=q.device, dtype=torch.float32)
    _backward[grid_size](
        q,
        k,
        v,
        offsets,
        bounds,
        gain32,
        taps32,
        lse,
        delta,
        grad_out,
        grad_q,
        grad_k,
        grad_v,
        grad_taps,
        width,
        **s,
        HAS_TAPS=taps is not None,
    )
    taps_grad = (
        v.new_zeros(0) if taps is None else grad_taps.sum(1).view(-1, heads, s["D"], width).sum(0).to(taps.dtype)
    )
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_gain.to(gain.dtype), taps_grad


@window_mix.register_fake
def _(q, k, v, gain, taps, offsets, bounds, grid):
    return (
        torch.empty_like(v),
        v.new_empty(v.shape, dtype=torch.float32),
        q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32),
    )


@window_mix_backward.register_fake
def _(q, k, v, gain, taps, offsets, bounds, grid, attn, lse, grad_out):
    taps_grad = v.new_empty(0) if taps is None else torch.empty_like(taps)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gain), taps_grad


def _setup(ctx, inputs, output) -> None:
    q, k, v, gain, taps, offsets, bounds, grid = inputs
    _, attn, lse = output
    ctx.mark_non_differentiable(attn, lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for attn (as large as v) and lse
    ctx.save_for_backward(q, k, v, gain, taps, offsets, bounds, attn, lse)
    ctx.grid = grid


def _grads(ctx, grad_out, _grad_attn, _grad_lse) -> tuple:
    if grad_out is None:  # no gradient reached the output (none is filled in: see _setup)
        return (None,) * 8
    q, k, v, gain, taps, offsets, bounds, attn, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_gain, grad_taps = window_mix_backward(
        q, k, v, gain, taps, offsets, bounds, ctx.grid, attn, lse, grad_out
    )
    return grad_q, grad_k, grad_v, grad_gain, None if taps is None else grad_taps, None, None, None


window_mix.register_autograd(_grads, setup_context=_setup)
