"""The functional form of Conv+ (docs/definition.md, 'Definition'), in four steps any backend shares:

    v     = values(x, ...)                 (B, K, d, *S)    1x1 projection C -> K*d (identity if no weight)
    q, k  = score_features(x + P, ...)     (B, K, Dq, *S)   'direct' (cosine, temperature) or 'qk'
    z     = mix(q, k, v, kernel, gain, ...)(B, K, d, *S)    g * neighborhood attention + depthwise conv
    y     = project_out(z, ...)            (B, C_out, *S)   1x1 projection K*d -> C_out, plus bias

``conv_plus`` runs all four; ``mix`` is where the backends differ.
"""

from __future__ import annotations

import math

import torch

from . import backends
from .backends.terms import direct_score
from .neighborhood import BORDERS, Neighborhood
from .validation import SCORES, bool_flags, check_input, one_of


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 projection over channels: x (B, C, *S), weight (O, C), bias (O,) -> (B, O, *S)."""
    y = torch.matmul(weight.to(x.dtype), x.flatten(2))
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    return y.view(x.shape[0], weight.shape[0], *x.shape[2:])


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, K*D, *S) -> (B, K, D, *S)."""
    return x.view(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:])


def values(
    x: torch.Tensor, heads: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """V = W_v x (+ b_v), split into heads: x (B, C, *S) -> (B, K, d, *S). No weight: V = x."""
    return split_heads(x if weight is None else pointwise(x, weight, bias), heads)


def score_features(
    x: torch.Tensor,
    heads: int,
    score: str = "direct",
    pos: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_weight: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, K, Dq, *S) with <q_i, k_j> = s_k(i, j), from x (B, C, *S) and pos P (C, *S).

    'direct': q = tau_k * nrm(slice_k(x^)), k = nrm(slice_k(x^)), Dq = C / K (temperature: (K,) > 0).
    'qk':     q = (Q x^ + b_q) / sqrt(Dq), k = K x^ + b_k, weights (K*Dq, C).
    """
    one_of("score", score, SCORES)
    x_hat = x if pos is None else x + pos.to(x.dtype)
    if score == "direct":
        return direct_score(x_hat, heads, temperature)
    q = split_heads(pointwise(x_hat, query_weight, query_bias), heads)
    k = split_heads(pointwise(x_hat, key_weight, key_bias), heads)
    return q * (1.0 / math.sqrt(q.shape[2])), k


def mix(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    kernel: torch.Tensor | None,
    gain: torch.Tensor | None,
    hood: Neighborhood,
    backend: str = "auto",
) -> torch.Tensor:
    """z_k,i = g_k * sum_{j in N(i)} A_k(i, j) V_k,j + sum_delta r_k(delta) * V_k,i+delta.

    q, k (B, K, Dq, *S) (q carries the score scale), v (B, K, D, *S), kernel (K, D, *kernel_size) or None,
    gain (K,) or None, hood the neighborhood (window, dilation, causal dims, border) -> z (B, K, D, *S).
    """
    return backends.resolve(backend, tuple(v.shape[3:]), v.device, hood).mix(q, k, v, kernel, gain, hood)


def project_out(z: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """y = W_o concat_k(z_k) + b: z (B, K, D, *S) -> (B, C_out, *S). No weight: W_o = identity."""
    y = z.flatten(1, 2)
    if weight is not None:
        return pointwise(y, weight, bias)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2)))
    return y


def conv_plus(
    x: torch.Tensor,
    *,
    heads: int,
    kernel: torch.Tensor | None,
    gain: torch.Tensor | None,
    window: tuple[int, ...] | None,
    dilation: tuple[int, ...],
    causal: bool | tuple[bool, ...] = False,
    border: str = "clip",
    score: str = "direct",
    pos: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_weight: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    value_weight: torch.Tensor | None = None,
    value_bias: torch.Tensor | None = None,
    output_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Conv+ of x (B, C, *S) -> (B, C_out, *S); see the module docstring for the four steps.

    ``window``/``dilation`` are tuples of len(S) ints (window None = global attention); ``causal`` a bool or
    one per dim (along a causal dim position i sees i and the positions before it, in both terms);
    ``border`` 'clip' or 'shift' (NATTEN's: the window slides inward at the grid's edge; attention only).
    ``gain=None`` drops the attention term, ``kernel=None`` the convolution term. Weight shapes: value
    (K*d, C), query/key (K*Dq, C), output (C_out, K*d), kernel (K, d, *kernel_size), gain/temperature (K,),
    pos (C, *S).
    """
    arguments = dict(locals())
    channels = value_weight.shape[1] if value_weight is not None else None
    check_input(x, len(dilation), channels)
    arguments["causal"] = bool_flags("causal", causal, len(dilation))
    one_of("border", border, BORDERS)
    one_of("score", score, SCORES)
    if (value_weight is None or score == "direct") and x.shape[1] % heads:
        raise ValueError(f"heads ({heads}) must divide the input channels, got input shape {tuple(x.shape)}")
    return conv_plus_unchecked(**arguments)


def conv_plus_unchecked(
    x: torch.Tensor,
    *,
    heads: int,
    kernel: torch.Tensor | None,
    gain: torch.Tensor | None,
    window: tuple[int, ...] | None,
    dilation: tuple[int, ...],
    causal: tuple[bool, ...] | None = None,
    border: str = "clip",
    score: str = "direct",
    pos: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_weight: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    value_weight: torch.Tensor | None = None,
    value_bias: torch.Tensor | None = None,
    output_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``conv_plus`` without its argument checks, for callers that made them already (a ``ConvPlus`` module
    checks its configuration once, at construction, and the input on every call); ``causal`` is a tuple of
    len(S) bools or None (no causal dim). Whether the backend can run here is still checked, before any
    compute."""
    spatial = tuple(x.shape[2:])
    hood = Neighborhood.of(window, dilation, causal, border)
    mixer = backends.resolve(backend, spatial, x.device, hood)
    layout = channels_last_format(x)
    if layout is not None and not mixer.any_layout:  # compute on a contiguous copy; y and x's gradient keep its layout
        x = _ContiguousKeepingGradLayout.apply(x, layout)
    v = values(x, heads, value_weight, value_bias)
    # without W_o the bias lands on z, and the mixing step adds it in the same pass
    z_bias = bias.view(heads, -1) if output_weight is None and bias is not None else None
    if gain is None:
        z = mixer.mix(None, None, v, kernel, gain, hood, z_bias)
    elif score == "direct" and mixer.direct_mix is not None:  # q and k computed inside the pass
        z = mixer.direct_mix(x, pos, temperature, v, kernel, gain, hood, z_bias)
    else:
        q, k = score_features(x, heads, score, pos, temperature, query_weight, query_bias, key_weight, key_bias)
        z = mixer.mix(q, k, v, kernel, gain, hood, z_bias)
    y = project_out(z, output_weight, bias if z_bias is None else None)
    return y if layout is None else y.contiguous(memory_format=layout)


def channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """torch.channels_last (4-d) or torch.channels_last_3d (5-d) when x is stored channels-last (and is not
    also plainly contiguous) outside torch.compile, else None."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if x.dim() not in formats or x.is_contiguous() or torch.compiler.is_compiling():
        return None
    return formats[x.dim()] if x.is_contiguous(memory_format=formats[x.dim()]) else None


class _ContiguousKeepingGradLayout(torch.autograd.Function):
    """x.contiguous(), with the gradient returned in ``layout`` (x's memory format): a channels-last network
    (timm's ConvNeXt) then never meets a mixed-layout gradient, which PyTorch's CPU kernels run slowly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.layout = layout
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.layout), None
