"""Where the time of a Conv+ call goes, from ``torch.profiler``: self CPU time per part (the fused kernel's
forward and backward passes, layout copies, reductions, the rest), for the speed suite.

The fused kernel computes the scores, softmax, aggregation and convolution term in one pass over the window, so
the profiler sees that pass as one event; its forward and backward passes are reported apart.

    python benchmarks/profile_table.py [--batch 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from convplus import ConvPlus2d

PARTS = {  # part -> test on an op name; the first part that matches takes the op
    "fused kernel, backward pass": lambda name: "convplus" in name and "backward" in name.lower(),
    "fused kernel, forward pass (scores, softmax, aggregation, conv term)": lambda name: "convplus" in name,
    "layout and dtype copies": lambda name: name in ("aten::copy_", "aten::clone", "aten::contiguous"),
    "reductions (aten::sum, aten::mean: bias gradients, the loss)": lambda name: name in ("aten::sum", "aten::mean"),
    "convolutions and matrix products (rest of the model)": lambda name: (
        name.startswith("aten::") and ("conv" in name or "mm" in name)
    ),
}


def self_times(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Self CPU seconds per op name, summed over ``repeats`` calls of fn after a warm-up call, divided by
    ``repeats``."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return {event.key: event.self_cpu_time_total / 1e6 / repeats for event in prof.key_averages()}


def part_rows(label: str, fn: Callable[[], object]) -> list[str]:
    """One table row per part (and 'everything else', naming its largest op) for the calls of fn."""
    times = self_times(fn)
    total = sum(times.values())
    parts = dict.fromkeys([*PARTS, "everything else"], 0.0)
    largest_other = ("", 0.0)
    for name, seconds in times.items():
        part = next((p for p, matches in PARTS.items() if matches(name)), "everything else")
        parts[part] += seconds
        if part == "everything else" and seconds > largest_other[1]:
            largest_other = (name, seconds)
    rows = []
    for part, seconds in parts.items():
        if seconds < 0.005 * total:
            continue
        shown = f"{part} (largest: {largest_other[0]})" if part == "everything else" else part
        rows.append(f"| {label} | {shown} | {seconds * 1e3:.1f} | {seconds / total:.0%} |")
    return rows


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()

    return step


def profile_section(mixer_batch: int, batch: int) -> list[str]:
    """The profile table: the mixer (64x56x56, channels-last) forward and forward+backward, and a forward+backward
    of convplus_convnextv2_atto at 224x224, channels-last."""
    mixer = ConvPlus2d(64, kernel_size=7, heads=4, proj=False, backend="cpu")
    x = torch.randn(mixer_batch, 64, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    model = timm.create_model("convplus_convnextv2_atto").to(memory_format=torch.channels_last)
    image = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def mixer_forward():
        with torch.no_grad():
            return mixer(x)

    cases = {
        f"mixer {mixer_batch}x64x56x56, forward": mixer_forward,
        f"mixer {mixer_batch}x64x56x56, forward+backward": lambda: mixer(x).sum().backward(),
        f"convplus_convnextv2_atto, batch {batch}, forward+backward": train_step(model, image),
    }
    rows = ["| case | part | self CPU time (ms per call) | share |", "|---|---|---|---|"]
    for label, fn in cases.items():
        rows += part_rows(label, fn)
        print(*rows[-3:], sep="\n", flush=True)
    rows += [
        "",
        "Self CPU time of the profiler's events, averaged over 3 calls after a warm-up, grouped by part; parts under "
        "0.5% are left out. The kernel reads its channels-last inputs and writes its outputs and gradients "
        "channels-last as they are (transposing rows in its per-thread buffers), so 'layout and dtype copies' is a "
        "part only where a tensor in another layout or dtype reaches it.",
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(profile_section(args.batch, args.batch)))


if __name__ == "__main__":
    main()
