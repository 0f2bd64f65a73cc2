"""``ConvPlus1d``, ``ConvPlus2d``, ``ConvPlus3d``: thin subclasses of one n-d module, as torch's Conv{n}d."""

import math
from collections.abc import Sequence

import torch
from timm.layers import register_notrace_module
from torch import nn

from . import backends, conversion
from .backends.reference import attention_probs
from .functional import conv_plus_unchecked, mix, score_features, values
from .neighborhood import BORDERS, Neighborhood
from .positional import resize_learned, sincos_encoding
from .validation import (
    POSITIONAL,
    SCORES,
    bool_flags,
    check_input,
    odd_sizes,
    one_of,
    positive_int,
    positive_sizes,
)

Size = int | Sequence[int]

MAX_LOG_TEMPERATURE = math.log(100.0)
"""The 'direct' score's temperature tau_k = exp(log_temperature_k) is capped at 100 (as in Swin V2)."""


class _ConvPlusNd(nn.Module):
    """Conv+ over ``spatial_dims`` spatial dims: x (B, C_in, *S) -> y (B, C_out, *S), stride 1, 'same'.

    y = W_o concat_k( g_k * sum_{j in N(i)} softmax_j(s_k(i, j)) V_k,j + depthwise_conv_k(V_k) ) + b,
    V = W_v x; s_k from the features plus an absolute positional encoding ('direct': cosine similarity of
    the head's channel slice times a learnable temperature; 'qk': scaled dot product of projections).
    docs/definition.md gives the exact definition.

    Args:
        in_channels: C_in.
        out_channels: C_out (default C_in).
        kernel_size: odd, per dim: the convolution term's kernel.
        window: odd, per dim: the attention neighborhood (default: ``kernel_size``); None = global.
        heads: K, the number of transformations (heads).
        head_dim: d, channels per head (default ``out_channels // heads``).
        qk_dim: Dq, query/key channels per head for ``score='qk'`` (default ``head_dim``).
        dilation: per dim, for both the convolution term and the neighborhood.
        score: 'direct' (features themselves, no Q/K; needs heads | in_channels) or 'qk'.
        pos: absolute positional encoding added before the scores: 'sincos', 'learned' or 'none'.
        pos_size: grid size of the 'learned' table; other input sizes resample it.
        proj: False makes W_v = W_o = identity (needs heads * head_dim == in_channels == out_channels).
        bias: output bias b, and the biases of the value/query/key projections.
        attention / convolution: False drops that term (and its parameters).
        causal: a bool, or one per dim: along a causal dim, position i sees only i and the positions before
            it: the window covers i and the ``window - 1`` dilated steps before it (window None: every earlier
            position), as NATTEN's ``is_causal``, and the convolution kernel's taps sit at offsets
            -(k - 1) * dilation .. 0 (a left-padded causal convolution). Output at i never depends on input
            after i along that dim.
        border: 'clip' (the window is centred on i and cut at the grid's edge) or 'shift' (NATTEN's rule: near
            an edge the window slides inward, so every query sees ``window`` points where the grid has them).
            The attention term only; nothing shifts along a causal dim.
        backend: 'auto' or one of ``convplus.backends.BACKENDS``: 'reference', 'local', 'global', 'cpu', 'triton'.

    Initialisation (``reset_parameters``): projections Xavier-uniform with zero biases (as
    ``nn.MultiheadAttention``); the convolution kernel uniform in +-1/sqrt(prod(kernel_size)) (the
    default of a depthwise ``nn.Conv``); gains g_k = 1 (both terms on from the start); temperatures
    tau_k = 10; a learned positional table ~ N(0, 0.02^2).

    Attributes: ``gain`` (K,), ``kernel`` (K, d, *kernel_size) (None when that term is off).
    """

    spatial_dims: int
    __constants__ = ("spatial_dims",)  # kept on the TorchScript module, for ``_conv_plus``
    __jit_unused_properties__ = ("temperature", "neighborhood")  # Python-side views, not compiled by TorchScript

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: Size = 7,
        window: Size | str | None = "kernel_size",
        heads: int = 4,
        head_dim: int | None = None,
        qk_dim: int | None = None,
        dilation: Size = 1,
        score: str = "direct",
        pos: str = "sincos",
        pos_size: Size = 14,
        proj: bool = True,
        bias: bool = True,
        attention: bool = True,
        convolution: bool = True,
        causal: bool | Sequence[bool] = False,
        border: str = "clip",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self.spatial_dims
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", in_channels if out_channels is None else out_channels)
        self.heads = positive_int("heads", heads)
        if head_dim is None and self.out_channels % self.heads:
            raise ValueError(f"heads ({heads}) must divide out_channels ({self.out_channels}) unless head_dim is given")
        self.head_dim = positive_int("head_dim", self.out_channels // self.heads if head_dim is None else head_dim)
        self.kernel_size = odd_sizes("kernel_size", kernel_size, n)
        if isinstance(window, str):
            if window != "kernel_size":
                raise ValueError(f"window must be odd ints, None or 'kernel_size', got {window!r}")
            window = self.kernel_size
        self.window = None if window is None else odd_sizes("window", window, n)
        self.dilation = positive_sizes("dilation", dilation, n)
        self.causal = bool_flags("causal", causal, n)
        self.border = one_of("border", border, BORDERS)
        self.score = one_of("score", score, SCORES)
        self.pos = one_of("pos", pos, POSITIONAL)
        self.backend = one_of("backend", backend, backends.CHOICES)
        self.proj = proj
        inner = self.heads * self.head_dim
        if not proj and not (inner == self.in_channels == self.out_channels):
            raise ValueError(
                "proj=False needs heads * head_dim == in_channels == out_channels, got "
                f"heads={self.heads}, head_dim={self.head_dim}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}"
            )
        if attention and score == "direct" and self.in_channels % self.heads:
            raise ValueError(f"score='direct' needs heads ({self.heads}) to divide in_channels ({self.in_channels})")
        self.qk_dim = positive_int("qk_dim", self.head_dim if qk_dim is None else qk_dim)
        factory = {"device": device, "dtype": dtype}

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, **factory))

        def optional(flag: bool, *shape: int) -> nn.Parameter | None:
            return param(*shape) if flag else None

        self.value_weight = optional(proj, inner, self.in_channels)
        self.value_bias = optional(proj and bias, inner)
        qk = attention and score == "qk"
        self.query_weight = optional(qk, self.heads * self.qk_dim, self.in_channels)
        self.query_bias = optional(qk and bias, self.heads * self.qk_dim)
        self.key_weight = optional(qk, self.heads * self.qk_dim, self.in_channels)
        self.key_bias = optional(qk and bias, self.heads * self.qk_dim)
        self.log_temperature = optional(attention and score == "direct", self.heads)
        self.gain = optional(attention, self.heads)
        self.kernel = optional(convolution, self.heads, self.head_dim, *self.kernel_size)
        self.output_weight = optional(proj, self.out_channels, inner)
        self.bias = optional(bias, self.out_channels)
        self.pos_size = positive_sizes("pos_size", pos_size, n)
        self.pos_embed = optional(attention and pos == "learned", self.in_channels, *self.pos_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The documented initialisation (see the class docstring)."""
        for weight in (self.value_weight, self.query_weight, self.key_weight, self.output_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        for b in (self.value_bias, self.query_bias, self.key_bias, self.bias):
            if b is not None:
                nn.init.zeros_(b)
        if self.kernel is not None:
            bound = 1.0 / math.sqrt(math.prod(self.kernel_size))
            nn.init.uniform_(self.kernel, -bound, bound)
        if self.gain is not None:
            nn.init.ones_(self.gain)
        if self.log_temperature is not None:
            nn.init.constant_(self.log_temperature, math.log(10.0))
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def temperature(self) -> torch.Tensor | None:
        """tau_k (K,) of the 'direct' score, or None."""
        return _temperature(self)

    @property
    def neighborhood(self) -> Neighborhood:
        """The geometry of both terms: window, dilation, causal dims and border rule."""
        return Neighborhood(self.window, self.dilation, self.causal, self.border)

    def positional_encoding(self, x: torch.Tensor) -> torch.Tensor | None:
        """P (C_in, *S) for the grid of x (B, C_in, *S), or None."""
        return _positional_encoding(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, *S) -> (B, C_out, *S).

        ``torch.jit.script`` compiles this method only: the op runs as a Python call (see ``_conv_plus``).
        """
        return self._conv_plus(x)

    @torch.jit.ignore
    def _conv_plus(self, x: torch.Tensor) -> torch.Tensor:
        """The Conv+ op, left to Python by TorchScript: the backends dispatch on device, dtype and grid size
        to Python code and custom ops of compiled kernels, which TorchScript cannot compile. A scripted model
        with Conv+ layers therefore runs and trains in a Python process, but ``torch.jit.save`` refuses it
        ("Could not export Python function call '_conv_plus'"); deploy through ONNX
        (``convplus.models.export_onnx``) instead.

        Under TorchScript ``self`` is the scripted module, which keeps the parameters, the plain attributes
        and the ``__constants__`` but not the Python methods: hence the module-level helpers below.
        """
        check_input(x, self.spatial_dims, self.in_channels)  # the configuration was checked at construction
        return conv_plus_unchecked(
            x,
            heads=self.heads,
            kernel=self.kernel,
            gain=self.gain,
            window=self.window,
            dilation=self.dilation,
            causal=self.causal,
            border=self.border,
            value_weight=self.value_weight,
            value_bias=self.value_bias,
            output_weight=self.output_weight,
            bias=self.bias,
            backend=self.backend,
            **_score_args(self, x),
        )

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """q, k (B, K, Dq, *S) (None without an attention term) and v (B, K, d, *S)."""
        check_input(x, self.spatial_dims, self.in_channels)
        v = values(x, self.heads, self.value_weight, self.value_bias)
        if self.gain is None:
            return None, None, v
        q, k = score_features(x, self.heads, **_score_args(self, x))
        return q, k, v

    def decompose(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two terms before the output projection, each (B, K*d, *S): 'attention' (gain applied) and
        'convolution'; a term that is off is zeros. Their sum, projected by W_o plus b, is ``forward(x)``."""
        q, k, v = self._features(x)
        terms = {}
        for name, kernel, gain in (("attention", None, self.gain), ("convolution", self.kernel, None)):
            z = mix(q, k, v, kernel, gain, self.neighborhood, self.backend)
            terms[name] = z.flatten(1, 2)
        return terms

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Dense attention weights A_k(i, j), (B, K, N, N), rows = queries, grid flattened row-major.

        O(N^2) memory: meant for analysis and plots on small inputs.
        """
        q, k, _ = self._features(x)
        if q is None:
            raise ValueError("this Conv+ module has no attention term (attention=False)")
        return attention_probs(q, k, self.neighborhood)

    @classmethod
    def from_conv(cls, conv: nn.Module, **overrides) -> "_ConvPlusNd":
        """An exact, trainable Conv+ copy of a depthwise or dense ``nn.Conv{n}d``.

        See docs/definition.md, 'Exact reductions'."""
        return conversion.from_conv(cls, conv, **overrides)

    @classmethod
    def from_attention(
        cls, mha: nn.MultiheadAttention, window: Size | None = None, dilation: Size = 1, **overrides
    ) -> "_ConvPlusNd":
        """An exact, trainable Conv+ copy of a self-attention ``nn.MultiheadAttention``; with ``causal=True``
        (an override, as any other Conv+ argument) of that attention under a causal mask (window None) or a
        causal band (window w, dilation).

        See docs/definition.md, 'Exact reductions'."""
        return conversion.from_attention(cls, mha, window=window, dilation=dilation, **overrides)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}",
            f"kernel_size={self.kernel_size}",
            f"window={self.window}",
            f"heads={self.heads}",
            f"head_dim={self.head_dim}",
        ]
        if self.dilation != (1,) * self.spatial_dims:
            parts.append(f"dilation={self.dilation}")
        if any(self.causal):
            parts.append(f"causal={self.causal}")
        if self.border != "clip":
            parts.append(f"border={self.border!r}")
        parts += [f"score={self.score!r}", f"pos={self.pos!r}"]
        if not self.proj:
            parts.append("proj=False")
        if self.gain is None:
            parts.append("attention=False")
        if self.kernel is None:
            parts.append("convolution=False")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _temperature(layer: _ConvPlusNd) -> torch.Tensor | None:
    """tau_k = exp(min(log_temperature_k, log 100)) (K,) of a 'direct' score layer, or None."""
    if layer.log_temperature is None:
        return None
    return layer.log_temperature.clamp(max=MAX_LOG_TEMPERATURE).exp()


def _positional_encoding(layer: _ConvPlusNd, x: torch.Tensor) -> torch.Tensor | None:
    """P (C_in, *S) of ``layer`` for the grid of x (B, C_in, *S), or None."""
    spatial = tuple(x.shape[2:])
    if layer.pos_embed is not None:
        return resize_learned(layer.pos_embed, spatial)
    if layer.pos == "sincos" and layer.gain is not None:
        return sincos_encoding(layer.in_channels, spatial, x.dtype, x.device)
    return None


def _score_args(layer: _ConvPlusNd, x: torch.Tensor) -> dict:
    """The score keyword arguments of ``conv_plus`` / ``score_features`` for ``layer`` on input x."""
    return {
        "score": layer.score,
        "pos": _positional_encoding(layer, x),
        "temperature": _temperature(layer),
        "query_weight": layer.query_weight,
        "query_bias": layer.query_bias,
        "key_weight": layer.key_weight,
        "key_bias": layer.key_bias,
    }


@register_notrace_module
class ConvPlus1d(_ConvPlusNd):
    """Conv+ over sequences: (B, C_in, L) -> (B, C_out, L). See ``_ConvPlusNd`` for the arguments."""

    spatial_dims = 1


@register_notrace_module
class ConvPlus2d(_ConvPlusNd):
    """Conv+ over images: (B, C_in, H, W) -> (B, C_out, H, W). See ``_ConvPlusNd`` for the arguments."""

    spatial_dims = 2


@register_notrace_module
class ConvPlus3d(_ConvPlusNd):
    """Conv+ over volumes / video: (B, C_in, T, H, W) -> (B, C_out, T, H, W). See ``_ConvPlusNd``."""

    spatial_dims = 3
