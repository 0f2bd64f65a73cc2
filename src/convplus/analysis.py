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
def layer_behaviour(model: nn.Module, images: torch.Tensor) -> list[dict]:
    """Per Conv+ layer (model order): name, gains (K,) list, attention energy share in [0, 1].

    images: (B, C, H, W) on the model's device. Returns [] for a model without Conv+ layers.
    """
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
    modules = dict(model.named_modules())
    stats = []
    for name, x in inputs.items():
        module = modules[name]
        terms = module.decompose(x)
        attention = terms["attention"].float().square().sum().item()
        convolution = terms["convolution"].float().square().sum().item()
        gains = module.gain.tolist() if module.gain is not None else []
        total = attention + convolution
        stats.append({"name": name, "gains": gains, "attention_share": attention / total if total else 0.0})
    return stats
