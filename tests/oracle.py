"""Conv+ written out from its definition, independently of the library: a dense N x N einsum per head.

Nothing here calls into ``convplus`` beyond reading a module's parameters, so a bug in a piece the backends
share (positional encoding, score features, values, softmax, convolution term) shows up as a mismatch.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def natten_window_start(index: int, length: int, window: int, dilation: int) -> int:
    """The first key of a query's window along one dim under NATTEN's border rule, written as NATTEN's
    reference writes it (``get_window_start``), for windows that fit in the grid (window * dilation <= length)."""
    half = window // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        group, whole = index % dilation, length // dilation * dilation
        rest = length - whole
        return length - rest + group - 2 * half * dilation if group < rest else whole + group - window * dilation
    return index - half * dilation


def _in_window(i: int, j: int, size: int, window: int | None, dilation: int, causal: bool, border: str) -> bool:
    """Whether key coordinate j is in query coordinate i's window along one dim of ``size`` points."""
    if window is None:
        return j <= i or not causal
    if (j - i) % dilation:
        return False
    if causal:
        return 0 <= i - j <= (window - 1) * dilation
    if border == "shift":
        start = natten_window_start(i, size, window, dilation)
        return start <= j <= start + (window - 1) * dilation
    return abs(j - i) <= (window // 2) * dilation


def neighborhood_blocked(
    grid: tuple[int, ...],
    window: tuple[int, ...] | None,
    dilation: tuple[int, ...],
    causal: tuple[bool, ...] | None = None,
    border: str = "clip",
):
    """(N, N) bool, True where j is NOT in N(i), row-major: by brute force over grid coordinates.

    clip: |j - i| <= (w // 2) * dilation and j - i a multiple of the dilation in every dim; all j when the
    window is None. causal dims: i - j in {0, dilation, ..., (w - 1) * dilation} (j <= i when the window is
    None). shift: NATTEN's window start (``natten_window_start``, for windows that fit in the grid).
    """
    n = len(grid)
    causal = causal or (False,) * n
    windows = window or (None,) * n
    points = list(itertools.product(*[range(s) for s in grid]))
    blocked = torch.zeros(len(points), len(points), dtype=torch.bool)
    for a, i in enumerate(points):
        for b, j in enumerate(points):
            blocked[a, b] = not all(
                _in_window(id_, jd, s, w, r, c, border)
                for id_, jd, s, w, r, c in zip(i, j, grid, windows, dilation, causal, strict=True)
            )
    return blocked


def sincos(channels: int, grid: tuple[int, ...]) -> torch.Tensor:
    """(channels, *grid) float64: channel block ``dim`` (2F channels, F = channels // 2n) holds sin then cos of
    the coordinate along ``dim`` times 10000^(-f/F), f = 0..F-1; channels beyond 2nF are zero."""
    n = len(grid)
    freqs = channels // (2 * n)
    table = torch.zeros(channels, *grid, dtype=torch.float64)
    for c in range(2 * n * freqs):
        dim, f = divmod(c, 2 * freqs)
        wave = math.sin if f < freqs else math.cos
        omega = 10000.0 ** (-(f % freqs) / freqs)
        for point in itertools.product(*[range(s) for s in grid]):
            table[(c, *point)] = wave(point[dim] * omega)
    return table


def conv_plus(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Conv+ output of ``module``'s parameters on x (B, C, *S) -> (B, C_out, *S), in x's dtype
    (differentiable in x and the parameters)."""
    batch, channels, *grid = x.shape
    grid, heads = tuple(grid), module.heads
    flat = x.flatten(2)  # (B, C, N)

    def project(weight, bias, features):  # (O, C) 1x1 projection of (B, C, N), split into heads
        out = features if weight is None else torch.einsum("oc,bcn->bon", weight, features)
        if weight is not None and bias is not None:
            out = out + bias[:, None]
        return out.reshape(batch, heads, -1, out.shape[-1])

    values = project(module.value_weight, module.value_bias, flat)  # (B, K, d, N)
    z = torch.zeros_like(values)
    if module.gain is not None:
        pos = {"sincos": sincos(channels, grid).to(x.dtype), "none": 0.0}.get(module.pos)
        if module.pos == "learned":
            pos = module.pos_embed
        x_hat = flat + (pos if isinstance(pos, float) else pos.flatten(1))
        if module.score == "direct":
            sliced = x_hat.reshape(batch, heads, -1, x_hat.shape[-1])
            unit = sliced / sliced.norm(dim=2, keepdim=True)
            tau = module.log_temperature.clamp(max=math.log(100.0)).exp()  # tau_k, capped at 100
            scores = tau[None, :, None, None] * torch.einsum("bkci,bkcj->bkij", unit, unit)
        else:
            q = project(module.query_weight, module.query_bias, x_hat)
            k = project(module.key_weight, module.key_bias, x_hat)
            scores = torch.einsum("bkci,bkcj->bkij", q, k) / math.sqrt(q.shape[2])
        blocked = neighborhood_blocked(grid, module.window, module.dilation, module.causal, module.border)
        probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
        z = z + module.gain[None, :, None, None] * torch.einsum("bkij,bkdj->bkdi", probs, values)
    if module.kernel is not None:
        ksize = module.kernel.shape[2:]
        # zero padding (k // 2) * dilation on both sides, or (k - 1) * dilation before along a causal dim
        padding = []
        for k, r, c in zip(reversed(ksize), reversed(module.dilation), reversed(module.causal), strict=True):
            padding += [(k - 1) * r, 0] if c else [(k // 2) * r] * 2
        conv = _CONV[len(grid)](
            F.pad(values.reshape(batch, -1, *grid), padding),
            module.kernel.reshape(-1, 1, *ksize),
            dilation=module.dilation,
            groups=values.shape[1] * values.shape[2],
        )
        z = z + conv.reshape(values.shape)
    y = z.reshape(batch, -1, z.shape[-1])
    if module.output_weight is not None:
        y = torch.einsum("oc,bcn->bon", module.output_weight, y)
    if module.bias is not None:
        y = y + module.bias[:, None]
    return y.reshape(batch, -1, *grid)
