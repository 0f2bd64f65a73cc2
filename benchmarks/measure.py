"""Measuring helpers shared by the benchmark scripts: median time, peak allocator memory, fitted exponents."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile


def timed(fn: Callable[[], torch.Tensor], backward: bool, repeats: int) -> float:
    """Median seconds of fn() (+ .sum().backward()) after one warm-up call (repeats 0: the one call's time)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = fn()
        if backward:
            out.float().sum().backward()
        if i or not repeats:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Paired(NamedTuple):
    """Per-pair ratios of fn's time over base's: their median, lowest and highest, and how many pairs."""

    median: float
    lowest: float
    highest: float
    pairs: int

    @classmethod
    def of(cls, ratios: list[float]) -> Paired:
        """The median, lowest and highest of per-pair ratios."""
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.lowest:.2f}x-{self.highest:.2f}x)"


def paired_ratio(
    base: Callable[[], torch.Tensor], fn: Callable[[], torch.Tensor], backward: bool, repeats: int
) -> Paired:
    """fn's time over base's, each call of fn timed right after a call of base so that both see the same machine
    state, over ``repeats`` pairs after one warm-up pair."""
    ratios = []
    for i in range(repeats + 1):
        pair = [timed(f, backward, 0) for f in (base, fn)]
        if i:
            ratios.append(pair[1] / pair[0])
    return Paired.of(ratios)


def peak_bytes(fn: Callable[[], torch.Tensor], backward: bool) -> int:
    """Peak bytes held by PyTorch's CPU allocator during one call of fn() (+ .sum().backward()), above what was
    held before: the running sum of the profiler's allocation and free events, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        if backward:
            out.float().sum().backward()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def fitted_exponent(points: list[tuple[int, float]]) -> float:
    """p in value ~ N^p, least squares on log-log points (N, value)."""
    xs, ys = [math.log(n) for n, _ in points], [math.log(max(v, 1e-12)) for _, v in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward, backward and AdamW step of ``model`` on x."""
    optimizer = torch.optim.AdamW(model.parameters())

    def step():
        optimizer.zero_grad()
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
