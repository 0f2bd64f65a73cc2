"""Interim ``make run``: a small Conv+ network against a same-size plain conv network on the digits.

Trains both for a few epochs on scikit-learn's 8x8 handwritten digits (upscaled to 16x16), on CPU, and
prints their test accuracy side by side with each Conv+ layer's learned gains.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from . import ConvPlus2d


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Train/test images (N, 1, 16, 16) in [0, 1] and labels (N,)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_tr, x_te, y_tr, y_te


def network(mixer: str, width: int = 32) -> nn.Sequential:
    """Stem, two residual mixer blocks (depthwise conv or Conv+) with MLPs, pooled linear head (10 classes)."""

    def mix() -> nn.Module:
        if mixer == "conv":
            return nn.Conv2d(width, width, 5, padding=2, groups=width)
        return ConvPlus2d(width, kernel_size=5, heads=4, proj=False)

    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
    for _ in range(2):
        layers += [mix(), nn.BatchNorm2d(width), nn.Conv2d(width, width, 1), nn.GELU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def train_and_test(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int = 8) -> float:
    """AdamW, batch 64; returns test accuracy."""
    x_tr, x_te, y_tr, y_te = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_te).argmax(1) == y_te).float().mean().item()


def main() -> None:
    data = digits()
    print(f"digits: {len(data[0])} train / {len(data[1])} test images, 16x16")
    print(f"{'model':8s} {'params':>8s} {'test acc':>9s} {'time':>7s}")
    models = {}
    for mixer in ("conv", "convplus"):
        torch.manual_seed(0)
        model = models[mixer] = network(mixer)
        start = time.perf_counter()
        acc = train_and_test(model, data)
        params = sum(p.numel() for p in model.parameters())
        print(f"{mixer:8s} {params:8d} {acc:9.3f} {time.perf_counter() - start:6.1f}s")
    print("Conv+ learned gains per layer (per head; 0 = pure conv):")
    for name, module in models["convplus"].named_modules():
        if isinstance(module, ConvPlus2d):
            print(f"  layer {name}: " + " ".join(f"{g:+.3f}" for g in module.gain.tolist()))


if __name__ == "__main__":
    main()
