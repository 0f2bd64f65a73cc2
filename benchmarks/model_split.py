"""Where a whole model's inference time goes, for the speed suite: the token mixers (every block's ``conv_dw``: the
depthwise conv in convnextv2_atto, Conv+ in convplus_convnextv2_atto) timed inside the model's forward by hooks,
and the rest of the forward. It shows how much faster the Conv+ mixers would have to run for the whole-model
inference target."""

from __future__ import annotations

import statistics
import time

import timm
import torch
from deployment import MODELS
from measure import Paired


class MixerClock:
    """Seconds spent inside a model's token mixers (``conv_dw`` of each block) since the last reset, by a forward
    pre-hook and a forward hook on each; ``count`` of them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._entered = 0.0
        mixers = [module.conv_dw for module in model.modules() if hasattr(module, "conv_dw")]
        for mixer in mixers:
            mixer.register_forward_pre_hook(self._enter)
            mixer.register_forward_hook(self._leave)
        self.count = len(mixers)

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        self._entered = time.perf_counter()

    def _leave(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.seconds += time.perf_counter() - self._entered


def model_split(batch: int, side: int, runs: int, bound: float) -> list[str]:
    """Markdown rows: the whole inference forward of both models (channels-last, (batch, 3, side, side)), their
    token mixers and the rest, each model's forward timed right after the other's, ``runs`` pairs after one warm-up
    pair; and the time the Conv+ mixers would have to fit in for the Conv+ model to run within ``bound`` times the
    plain one, with the rest as measured."""
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    models, clocks = [], []
    for name in MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name).to(memory_format=torch.channels_last).eval()
        models.append(model)
        clocks.append(MixerClock(model))
    times: dict[str, list[list[float]]] = {part: [[], []] for part in ("whole", "mixers", "rest")}
    with torch.no_grad():
        for run in range(runs + 1):
            for i, (model, clock) in enumerate(zip(models, clocks, strict=True)):
                clock.seconds = 0.0
                start = time.perf_counter()
                model(x)
                whole = time.perf_counter() - start
                if run:
                    for part, seconds in zip(times, (whole, clock.seconds, whole - clock.seconds), strict=True):
                        times[part][i].append(seconds)
    names = {
        "whole": "whole forward",
        "mixers": f"the {clocks[0].count} token mixers (`conv_dw`)",
        "rest": "everything else",
    }
    rows = [
        f"| inference, batch {batch}, {side}x{side} | plain atto (ms) | Conv+ atto (ms) | Conv+ / plain, paired |",
        "|---|---|---|---|",
    ]
    ms = {part: [statistics.median(t) * 1e3 for t in pair] for part, pair in times.items()}
    ratios = {part: Paired.of([b / a for a, b in zip(*pair, strict=True)]) for part, pair in times.items()}
    rows += [f"| {names[part]} | {ms[part][0]:.1f} | {ms[part][1]:.1f} | {ratios[part]} |" for part in times]
    budget = bound * ms["whole"][0] - ms["rest"][1]
    rows += [
        "",
        f"Medians of {runs} runs of each model, each Conv+ run right after a plain one; the mixers are timed by "
        "hooks around each block's `conv_dw` (the Python call included), the rest is the whole forward less them. "
        f"For the Conv+ model to run within {bound:.2f}x the plain one with everything else as measured, its "
        f"{clocks[1].count} mixers would have to run in {budget:.1f} ms, "
        f"{budget / ms['mixers'][0]:.1f}x the depthwise convs' {ms['mixers'][0]:.1f} ms; they take "
        f"{ratios['mixers'].median:.1f}x. A windowed Conv+ mixer makes 2.5 multiply-adds per window tap "
        "and channel where the depthwise conv makes one (the 'direct' score once per pair of positions, as it is "
        "symmetric, the aggregation, the conv term), before its exponentials and softmax.",
    ]
    return rows
