"""Where the time of a Conv+ call goes: self CPU time per part from ``torch.profiler`` (the fused kernel's passes,
layout copies, reductions, the rest), with each pass of the fused kernel split into its phases (scores, softmax,
aggregation and convolution term, layout copies, each backward product) by the kernel's own phase clock
(``convplus.backends.cpu.phase_clock``), for the speed suite.

    python benchmarks/profile_table.py [--batch 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from convplus import ConvPlus2d
from convplus.backends import cpu

KERNEL_PASSES = ("forward", "backward")
"""The fused kernel's passes: profiler events whose names are split into the phases of the same prefix."""


def kernel_pass(name: str) -> str | None:
    """Which pass of the fused mixing kernel the profiler event ``name`` is, or None. Under autograd the forward
    op's event is named GeneratedBackwardFor_convplus_..._default and its backward's ..._defaultBackward."""
    if "convplus" not in name or "direct_score" in name or "global_mix" in name:
        return None
    return "backward" if name.endswith("Backward") or "_backward" in name else "forward"


PARTS = {  # part -> test on an op name; the first part that matches takes the op
    "global attention: its C++ pass and backward (scores, softmax, weighted sum)": lambda name: "global_mix" in name,
    "'direct' score backward (keys recomputed, gradients of x, pos, tau)": lambda name: (
        name == "convplus::direct_score_backward"
    ),
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


def phase_shares(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """The fraction of its pass's thread time that each phase of the fused kernel took over ``repeats`` calls of
    fn (after the warm-up of self_times): forward phases sum to 1, backward phases too where fn runs backward."""
    with cpu.phase_clock() as phases:
        for _ in range(repeats):
            fn()
    shares = {}
    for kind in KERNEL_PASSES:
        in_pass = {name: seconds for name, seconds in phases.items() if name.startswith(f"{kind}:")}
        total = sum(in_pass.values())
        shares |= {name: seconds / total for name, seconds in in_pass.items() if total}
    return shares


def part_times(fn: Callable[[], object]) -> tuple[dict[str, float], str]:
    """Seconds per call per part, each pass of the fused kernel split into its phases in proportion to their
    thread time, and the name of the largest op in 'everything else'."""
    times = self_times(fn)
    passes = dict.fromkeys(KERNEL_PASSES, 0.0)
    parts = dict.fromkeys([*PARTS, "everything else"], 0.0)
    largest_other = ("", 0.0)
    for name, seconds in times.items():
        if kind := kernel_pass(name):
            passes[kind] += seconds
            continue
        part = next((p for p, matches in PARTS.items() if matches(name)), "everything else")
        parts[part] += seconds
        if part == "everything else" and seconds > largest_other[1]:
            largest_other = (name, seconds)
    phases = {
        f"fused kernel, {phase}": passes[phase.split(":")[0]] * share for phase, share in phase_shares(fn).items()
    }
    return phases | parts, largest_other[0]


def part_rows(label: str, fn: Callable[[], object]) -> list[str]:
    """One table row per part (and 'everything else', naming its largest op) for the calls of fn; parts under
    0.5% of the total are left out."""
    parts, largest_other = part_times(fn)
    total = sum(parts.values())
    rows = []
    for part, seconds in parts.items():
        if seconds < 0.005 * total:
            continue
        shown = f"{part} (largest: {largest_other})" if part == "everything else" else part
        rows.append(f"| {label} | {shown} | {seconds * 1e3:.2f} | {seconds / total:.0%} |")
    return rows


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()

    return step


def inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(x)

    return run


def profile_section(mixer_batch: int, batch: int) -> list[str]:
    """The profile table: the mixer (64x56x56, channels-last) forward and forward+backward, and
    convplus_convnextv2_atto at 224x224, channels-last, inference and forward+backward."""
    mixer = ConvPlus2d(64, kernel_size=7, heads=4, proj=False, backend="cpu")
    x = torch.randn(mixer_batch, 64, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    model = timm.create_model("convplus_convnextv2_atto").to(memory_format=torch.channels_last)
    image = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    cases = {
        f"mixer {mixer_batch}x64x56x56, forward": inference(mixer, x),
        f"mixer {mixer_batch}x64x56x56, forward+backward": lambda: mixer(x).sum().backward(),
        f"convplus_convnextv2_atto, batch {batch}, inference": inference(model, image),
        f"convplus_convnextv2_atto, batch {batch}, forward+backward": train_step(model, image),
    }
    rows = ["| case | part | self CPU time (ms per call) | share |", "|---|---|---|---|"]
    for label, fn in cases.items():
        rows += part_rows(label, fn)
    rows += [
        "",
        "Self CPU time of the profiler's events, averaged over 3 calls after a warm-up, grouped by part; parts under "
        "0.5% are left out. The fused kernel is one event per pass; its time is split between the phases in "
        "proportion to their time on the kernel's own phase clock (`convplus.backends.cpu.phase_clock`, summed "
        "over threads, over 3 more calls). 'Rows in' and 'rows out' are the kernel's own layout work: it reads its "
        "channels-last inputs and writes its outputs and gradients as they are, transposing rows into and out of "
        "its per-thread row buffers, so a separate 'layout and dtype copies' part appears only where a tensor in "
        "another layout or dtype reaches it. In the forward the aggregation and the convolution term are one "
        "product (weights g P + r), not two, which also adds the bias. In forward+backward the forward keeps the "
        "probabilities for backward, which its softmax phase writes.",
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(profile_section(args.batch, args.batch)))


if __name__ == "__main__":
    main()
