"""What each Conv+ layer learned: its gains, and how much of its output is attention vs convolution.

``layer_behaviour`` runs a model on a batch, captures the input of every Conv+ layer with a forward hook and
splits that layer's output into its two terms (``ConvPlus.decompose``). The energy share of the attention
term is ||attention||^2 / (||attention||^2 + ||convolution||^2), over the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import _ConvPlusNd


@torch.no_grad()
def capture_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input (B, C, *S) of every Conv+ layer when ``model`` (eval mode) runs on ``images``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, _ConvPlusNd)
    ]
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def layer_behaviour(model: nn.Module, images: torch.Tensor) -> list[dict]:
    """Per Conv+ layer (model order): name, gains (K,) list, attention energy share in [0, 1].

    images: (B, C, H, W) on the model's device. Returns [] for a model without Conv+ layers.
    """
    modules = dict(model.named_modules())
    stats = []
    for name, x in capture_inputs(model, images).items():
        module = modules[name]
        terms = module.decompose(x)
        attention = terms["attention"].float().square().sum().item()
        convolution = terms["convolution"].float().square().sum().item()
        gains = module.gain.tolist() if module.gain is not None else []
        total = attention + convolution
        stats.append({"name": name, "gains": gains, "attention_share": attention / total if total else 0.0})
    return stats


@torch.no_grad()
def attention_distance(model: nn.Module, images: torch.Tensor, max_cells: int | None = None) -> dict[str, float]:
    """Per Conv+ layer with an attention term: mean over queries, heads and images of sum_j A(i, j) |j - i|,
    the expected Euclidean distance (in that layer's grid cells) between a query and what it attends to.
    Layers whose grid has more than ``max_cells`` cells are skipped (the attention matrix is N x N)."""
    modules = dict(model.named_modules())
    distances = {}
    for name, x in capture_inputs(model, images).items():
        module = modules[name]
        if module.gain is None or (max_cells is not None and x[0, 0].numel() > max_cells):
            continue
        probs = module.attention_probs(x)  # (B, K, N, N)
        grids = torch.meshgrid(*[torch.arange(s, dtype=probs.dtype) for s in x.shape[2:]], indexing="ij")
        coords = torch.stack([g.reshape(-1) for g in grids], dim=-1)
        distance = torch.cdist(coords, coords)  # (N, N)
        distances[name] = (probs * distance).sum(-1).mean().item()
    return distances


def layer_summary(model: nn.Module, images: torch.Tensor, distance_images: int = 8) -> list[dict]:
    """``layer_behaviour`` plus each layer's ``mean_attention_distance`` (on the first ``distance_images``
    images; None for a layer without attention term or with a grid over 1024 cells)."""
    stats = layer_behaviour(model, images)
    if stats:
        distances = attention_distance(model, images[:distance_images], max_cells=1024)
        for layer in stats:
            layer["mean_attention_distance"] = distances.get(layer["name"])
    return stats
