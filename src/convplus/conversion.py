"""Exact conversions (docs/definition.md, 'Exact reductions'): convolutions and self-attention as Conv+ modules.

The results are ordinary, trainable Conv+ modules: a converted conv starts as that exact conv (g = 0) and
can learn attention from there; a converted attention starts with r = 0 and can learn a convolution.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .modules import _ConvPlusNd

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _check_conv(conv: nn.Module, n: int) -> None:
    expected = _CONV_TYPES[n]
    if type(conv) is not expected:
        raise TypeError(f"conv must be a {expected.__name__}, got {type(conv).__name__}")
    ksize, dilation = conv.kernel_size, conv.dilation
    if any(k % 2 == 0 for k in ksize):
        raise ValueError(f"conv.kernel_size must be odd in every dim, got {ksize}")
    if any(s != 1 for s in conv.stride):
        raise ValueError(f"conv.stride must be 1, got {conv.stride}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
    same = tuple(r * (k // 2) for k, r in zip(ksize, dilation, strict=True))
    if conv.padding != "same" and tuple(conv.padding) != same:
        raise ValueError(f"conv.padding must be dilation * (kernel_size // 2) = {same} ('same'), got {conv.padding}")
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    if conv.groups != 1 and not depthwise:
        raise ValueError(
            f"conv must be dense (groups=1) or depthwise (groups=in_channels=out_channels), got groups="
            f"{conv.groups}, in_channels={conv.in_channels}, out_channels={conv.out_channels}"
        )


def from_conv(cls: type[_ConvPlusNd], conv: nn.Module, **overrides) -> _ConvPlusNd:
    """Conv+ computing exactly ``conv`` (depthwise or dense, odd kernel, any dilation, stride 1, 'same').

    Depthwise: proj=False, heads = gcd(C, 4) unless given, r = conv weight, g = 0, b = conv bias.
    Dense: K = prod(kernel_size) heads of d = C_out, V_k = W_delta_k x, r_k one-hot at delta_k,
    W_o = [I ... I] sums the heads, g = 0. Its score is 'direct' when K divides C_in, else 'qk'.
    ``overrides`` set other Conv+ arguments (score, pos, window, ...); they never change the output, except
    ``causal``, which makes it the same kernel as a left-padded causal convolution (input padded by
    (k - 1) * dilation before each causal dim instead of k // 2 * dilation on both sides).
    """
    _check_conv(conv, cls.spatial_dims)
    c_in, c_out, ksize = conv.in_channels, conv.out_channels, tuple(conv.kernel_size)
    has_bias = conv.bias is not None
    common = {"kernel_size": ksize, "dilation": tuple(conv.dilation), "bias": has_bias}
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    if conv.groups != 1 or c_in == c_out == 1:
        heads = overrides.pop("heads", math.gcd(c_in, 4))
        module = cls(c_in, c_in, heads=heads, proj=False, **common, **overrides, **factory)
        with torch.no_grad():
            module.kernel.copy_(conv.weight.reshape(module.kernel.shape))
    else:
        heads = math.prod(ksize)
        overrides.setdefault("score", "direct" if c_in % heads == 0 else "qk")
        module = cls(c_in, c_out, heads=heads, head_dim=c_out, proj=True, **common, **overrides, **factory)
        with torch.no_grad():
            value = module.value_weight.view(heads, c_out, c_in)
            module.kernel.zero_()
            for head, delta in enumerate(itertools.product(*[range(k) for k in ksize])):
                value[head] = conv.weight[(Ellipsis, *delta)]
                module.kernel[(head, slice(None), *delta)] = 1.0
            module.output_weight.copy_(torch.eye(c_out, **factory).repeat(1, heads))
            if module.value_bias is not None:
                module.value_bias.zero_()
    with torch.no_grad():
        if module.gain is not None:
            module.gain.zero_()
        if has_bias:
            module.bias.copy_(conv.bias)
    return module


def from_attention(
    cls: type[_ConvPlusNd],
    mha: nn.MultiheadAttention,
    window: int | tuple[int, ...] | None = None,
    dilation: int | tuple[int, ...] = 1,
    **overrides,
) -> _ConvPlusNd:
    """Conv+ computing exactly the self-attention ``mha`` on the flattened grid (window None) or neighborhood
    attention (window w, dilation): 'qk', pos='none', K = mha.num_heads, g = 1, r = 0.

    The convolution term's kernel_size defaults to the window (3 for global attention). Attention dropout
    is not carried over: compare in eval mode. With the override ``causal=True`` it is that attention under
    a causal mask (window None: ``attn_mask`` the strict upper triangle) or a causal band (window w: key
    i - m * dilation for m < w).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim:
        raise ValueError(
            f"mha must be self-attention (kdim == vdim == embed_dim), got kdim={mha.kdim}, vdim={mha.vdim}"
        )
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("mha must not use add_bias_kv or add_zero_attn")
    embed, heads = mha.embed_dim, mha.num_heads
    overrides.setdefault("kernel_size", 3 if window is None else window)
    has_bias = mha.in_proj_bias is not None
    module = cls(
        embed,
        embed,
        window=window,
        heads=heads,
        head_dim=mha.head_dim,
        qk_dim=mha.head_dim,
        dilation=dilation,
        score="qk",
        pos="none",
        proj=True,
        bias=has_bias,
        **overrides,
        device=mha.in_proj_weight.device,
        dtype=mha.in_proj_weight.dtype,
    )
    with torch.no_grad():
        for weight, source in zip(
            (module.query_weight, module.key_weight, module.value_weight), mha.in_proj_weight.chunk(3), strict=True
        ):
            weight.copy_(source)
        module.output_weight.copy_(mha.out_proj.weight)
        if has_bias:
            for b, source in zip(
                (module.query_bias, module.key_bias, module.value_bias), mha.in_proj_bias.chunk(3), strict=True
            ):
                b.copy_(source)
            module.bias.copy_(mha.out_proj.bias)
        module.gain.fill_(1.0)
        if module.kernel is not None:
            module.kernel.zero_()
    return module
