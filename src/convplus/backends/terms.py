"""Pieces every backend shares: the convolution term and the blend of the two terms.

Shapes: q, k (B, K, Dq, *S); v (B, K, D, *S); kernel (K, D, *kernel_size); gain (K,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..neighborhood import Neighborhood

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def convolution_term(
    v: torch.Tensor, kernel: torch.Tensor, hood: Neighborhood, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_delta r_k(delta) * V_k,i+delta (+ bias): a dilated depthwise conv of the values, zero padding; centred,
    or left-padded along the causal dims of ``hood`` (taps at offsets -(k - 1) * dilation .. 0); the bias, if any,
    added by the conv itself.

    v (B, K, D, *S), kernel (K, D, *kernel_size), bias (K, D) or None -> (B, K, D, *S), in v's layout.
    """
    batch, heads, dim = v.shape[:3]
    spatial, ksize = v.shape[3:], kernel.shape[2:]
    reach = hood.kernel_reach(tuple(ksize))  # per dim, zero padding -first tap offset left, last tap offset right
    both = [min(-taps[0], taps[-1]) for taps in reach]  # the part the conv pads on both sides
    one_sided = [
        p for taps, b in zip(reversed(reach), reversed(both), strict=True) for p in (-taps[0] - b, taps[-1] - b)
    ]
    flat = _with_whole_batch_stride(v.reshape(batch, heads * dim, *spatial))
    if any(one_sided):
        flat = F.pad(flat, one_sided)
    weight = kernel.reshape(heads * dim, 1, *ksize).to(v.dtype)
    flat_bias = None if bias is None else bias.reshape(heads * dim).to(v.dtype)
    return _CONV[len(spatial)](flat, weight, flat_bias, 1, both, hood.dilation, heads * dim).view(v.shape)


def _with_whole_batch_stride(x: torch.Tensor) -> torch.Tensor:
    """x (1, C, *S) stored channels-last, as a view whose batch stride spans the whole image; x itself otherwise.

    A view of a channels-last image of batch 1 (``x.view(1, K, D, *S)`` and back) may give its batch the stride of
    the channels alone. PyTorch still calls it channels-last, but oneDNN's layout choice, which reads the strides,
    then runs the convolution on NCHW: about twice as slow, and with an NCHW output."""
    if x.shape[0] != 1 or x.dim() < 3 or x.stride(1) != 1:
        return x
    channels_last = x.movedim(1, -1)
    if not channels_last.is_contiguous():
        return x
    return channels_last.reshape(-1).view(channels_last.shape).movedim(-1, 1)


def blend(
    attention: torch.Tensor | None,
    gain: torch.Tensor | None,
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    hood: Neighborhood,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = g_k * attention + conv term + bias (K, D); any of the three may be absent (None). Returns
    (B, K, D, *S). With a convolution term, the conv adds the bias and one pass the attention, which may come in
    any strides (z takes the conv's layout, v's)."""
    if kernel is None:
        z = (
            attention * _per_head(gain, attention)
            if attention is not None and gain is not None
            else torch.zeros_like(v)
        )
        return add_bias(z, bias)
    return add_attention(convolution_term(v, kernel, hood, bias), attention, gain)


def add_attention(base: torch.Tensor, attention: torch.Tensor | None, gain: torch.Tensor | None) -> torch.Tensor:
    """base + g_k * attention, in one pass and in base's layout (attention may come in any strides); base itself if
    either of attention and gain is None. base, attention (B, K, D, *S), gain (K,)."""
    if attention is None or gain is None:
        return base
    return torch.addcmul(base, attention, _per_head(gain, attention))


def _per_head(gain: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """gain (K,) as (1, K, 1, ...), broadcasting against ``like`` (B, K, D, *S), in its dtype."""
    return gain.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def add_bias(z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """z (B, K, D, *S) + bias (K, D) (None: z)."""
    return z if bias is None else z + bias.to(z.dtype).view(1, *bias.shape, *([1] * (z.dim() - 3)))


def with_convolution_term(attend: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A backend's ``mix`` from its attention term ``attend(q, k, v, hood) -> (B, K, D, *S)``:
    z = g * attend(...) + conv term, skipping the attention when there is no gain."""

    def mix(q, k, v, kernel, gain, hood, bias=None) -> torch.Tensor:
        attention = attend(q, k, v, hood) if gain is not None else None
        return blend(attention, gain, v, kernel, hood, bias)

    mix.__doc__ = f"z = g * ({attend.__module__}.attend) + depthwise conv term + bias; see convplus.backends."
    return mix


def direct_score(x_hat: torch.Tensor, heads: int, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'direct' score's q = tau_k * nrm(slice_k(x^)) and k = nrm(slice_k(x^)), each (B, K, C / K, *S), from
    x^ (B, C, *S) (features plus positional encoding) and temperature (K,)."""
    sliced = x_hat.view(x_hat.shape[0], heads, x_hat.shape[1] // heads, *x_hat.shape[2:])
    # x / max(||x||, 1e-12), as F.normalize, but ~5x faster on dim 2
    unit = sliced * torch.rsqrt(sliced.square().sum(dim=2, keepdim=True).clamp_min(1e-24))
    scale = temperature.to(x_hat.dtype).view(1, heads, *([1] * (unit.dim() - 2)))
    return unit * scale, unit


def softmax_probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim, computed in float32 (or float64) and returned in ``dtype``."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return torch.softmax(scores, dim=-1, dtype=acc).to(dtype)
