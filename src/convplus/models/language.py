"""Byte-level decoder language models whose token mixer is chosen by name: causal Conv+, causal attention (a
transformer), or a causal depthwise convolution, at matched parameter counts.

``ByteLM``: token embedding (256 bytes, times sqrt(dim): with the embedding's small initialisation, std 0.02,
the fixed positions of amplitude 1 would otherwise drown the tokens) + fixed sine-cosine positions, pre-norm
blocks (x + mixer(norm(x)), x + mlp(norm(x))), a final norm, and a head tied to the embedding. The MLP's
hidden width of each block is chosen so that the block has as many parameters as a transformer block with a
4x MLP: the three mixers are compared at equal size.

Registered with timm (``timm.create_model("convplus_lm_tiny", depth=2, ...)``, ``convplus train --task lm
--model convplus_lm_tiny``): ``{convplus,transformer,conv}_lm_{tiny,small}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..positional import sincos_encoding
from .registry import register_builder
from .token_mixers import MIXERS

VOCAB = 256  # bytes

SIZES = {"tiny": {"dim": 128, "depth": 4, "heads": 4}, "small": {"dim": 256, "depth": 6, "heads": 8}}


def layer_plan(depth: int, window: int = 15, global_layers: int = 1) -> list[dict]:
    """Per-layer mixer settings: windowed layers with dilation 1, 2, 4, ... (each layer reaches twice as far
    back), then ``global_layers`` layers with ``window=None`` (every earlier position) on top."""
    windowed = depth - global_layers
    if not 0 <= global_layers <= depth:
        raise ValueError(f"global_layers must be in [0, depth={depth}], got {global_layers}")
    return [{"window": window, "dilation": 2**i} for i in range(windowed)] + [{"window": None}] * global_layers


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); x (B, L, D)."""

    def __init__(self, dim: int, mixer: nn.Module, hidden: int):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """A decoder over bytes: tokens (B, L) int64 in [0, 256) -> next-byte logits (B, L, 256); the logits at t
    depend on tokens[:, :t + 1] only.

    Args:
        mixer: 'convplus' | 'transformer' | 'conv' (``convplus.models.token_mixers.MIXERS``).
        dim, depth, heads: width, blocks, heads of the mixers.
        plan: per-block mixer settings (``window``, ``dilation``), default ``layer_plan(depth)``.
        mixer_kwargs: settings shared by every block's mixer (e.g. ``kernel_size``, ``score``, ``backend``).
        mlp_ratio: the MLP width of the reference (transformer) block that every block is sized to match.
    """

    def __init__(
        self,
        mixer: str = "convplus",
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        plan: Sequence[dict] | None = None,
        mixer_kwargs: dict | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {', '.join(MIXERS)}, got {mixer!r}")
        plan = layer_plan(depth) if plan is None else list(plan)
        if len(plan) != depth:
            raise ValueError(f"plan has {len(plan)} entries for depth {depth}")
        self.mixer_name, self.dim = mixer, dim
        reference = (
            _count(MIXERS["transformer"](dim, heads)) + 2 * dim * round(mlp_ratio * dim) + round(mlp_ratio * dim)
        )
        self.embed = nn.Embedding(VOCAB, dim)
        blocks = []
        for settings in plan:
            mix = MIXERS[mixer](dim, heads, **settings, **(mixer_kwargs or {}))
            hidden = max(1, round((reference - _count(mix)) / (2 * dim + 1)))
            blocks.append(Block(dim, mix, hidden))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be (B, L) int64, got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens) * self.dim**0.5  # as Vaswani et al.: tokens on the scale of the positions
        x = x + sincos_encoding(self.dim, (tokens.shape[1],), x.dtype, x.device).T
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    @torch.no_grad()
    def generate(
        self,
        prompt: bytes,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        context: int = 256,
        generator: torch.Generator | None = None,
    ) -> bytes:
        """``tokens`` bytes following ``prompt``, sampled one at a time from the logits at the last position
        (over at most the last ``context`` bytes), divided by ``temperature``, restricted to the ``top_k``
        likeliest; ``temperature=0`` takes the likeliest byte."""
        if temperature < 0 or (top_k is not None and not 1 <= top_k <= VOCAB) or tokens < 0 or context < 1:
            raise ValueError(
                f"expected temperature >= 0, top_k in [1, {VOCAB}], tokens >= 0, context >= 1; got "
                f"temperature={temperature}, top_k={top_k}, tokens={tokens}, context={context}"
            )
        was_training = self.training
        self.eval()
        device = self.embed.weight.device
        sequence = torch.tensor(list(prompt or b"\n"), dtype=torch.int64, device=device)[None]
        for _ in range(tokens):
            logits = self(sequence[:, -context:])[0, -1].float()
            if temperature == 0:
                choice = logits.argmax()[None]
            else:
                if top_k is not None:
                    logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
                choice = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            sequence = torch.cat([sequence, choice[None]], 1)
        self.train(was_training)
        return bytes(sequence[0, len(prompt or b"\n") :].tolist())


def _register(mixer: str, size: str) -> None:
    def build(**kwargs) -> nn.Module:
        return ByteLM(mixer, **{**SIZES[size], **kwargs})

    register_builder(
        f"{mixer}_lm_{size}",
        build,
        f"Byte-level decoder with {mixer} token mixers, {size} size (see convplus.models.language).",
        __name__,
    )


for _mixer in MIXERS:
    for _size in SIZES:
        _register(_mixer, _size)
