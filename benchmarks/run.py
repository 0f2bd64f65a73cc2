"""The Conv+ speed suite (``make bench``): every figure is a ratio against a baseline timed in the same run
(median of repeats). Writes docs/performance.md (ending with the speed targets, met or not, computed from
the tables) and docs/scaling.png.

    python benchmarks/run.py [--quick] [--threads N] [--repeats 5] [--default-malloc]

On Linux the suite re-runs itself with glibc's malloc set to keep freed memory (``RETAINING_MALLOC``), as
jemalloc and tcmalloc do and as PyTorch's CPU tuning guide advises: with the default settings every large
tensor is freshly mapped memory, and its page faults, which vary from run to run on this VM, cost more than
the depthwise conv baseline itself. ``--default-malloc`` measures with the default settings instead.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import flex_neighborhood_attention, natten_neighborhood_attention, unfold_neighborhood_attention
from measure import fitted_exponent, paired_ratio, peak_bytes, timed

import convplus  # noqa: F401
from convplus import ConvPlus2d
from convplus.backends import cpu, global_attention
from convplus.info import cpu_model, package_version
from convplus.neighborhood import Neighborhood

ATTO_STAGES = [(40, 56), (80, 28), (160, 14), (320, 7)]
TINY_STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]
DWCONV, CONVPLUS = "depthwise conv 7x7 (baseline)", "Conv+ mixer, backend 'cpu'"
ATTENTION, UNFOLD = "attention term only: fused C++ kernel", "attention term only: unfold neighborhood attention"
FLEX = "attention term only: FlexAttention (compiled, block mask)"
NATTEN = "attention term only: NATTEN na2d (Flex backend, uncompiled)"
RETAINING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def with_retaining_malloc() -> None:
    """Re-execute this script with RETAINING_MALLOC in the environment unless it is there (glibc reads it at
    start-up only)."""
    if platform.system() == "Linux" and any(os.environ.get(k) != v for k, v in RETAINING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINING_MALLOC})


def _no_grad(fn: Callable, repeats: int) -> float:
    with torch.no_grad():
        return timed(fn, False, repeats)


def activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes a training step keeps for one call: the output plus the distinct tensors saved for backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    saved.pop(out.untyped_storage().data_ptr(), None)
    return sum(saved.values()) + out.untyped_storage().nbytes()


def machine_rates(repeats: int) -> tuple[float, float]:
    """Measured float32 matmul GFLOP/s (2048^3) and copy GB/s (read + write of 256 MiB)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = timed(lambda: a @ b, False, repeats)
    src = torch.empty(64 * 2**20)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), False, repeats)
    return 2 * 2048**3 / matmul / 1e9, 2 * src.numel() * 4 / copy / 1e9


def mixer_cases(batch: int, channels: int, side: int, heads: int = 4, window: int = 7) -> tuple[dict, list]:
    """name -> callable running one mixer on a fixed input that requires grad; and the (q, k, v) it uses."""
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    dw = torch.nn.Conv2d(channels, channels, window, padding=window // 2, groups=channels)
    cases = {DWCONV: lambda: dw(x)}
    for backend in ("cpu", "local"):
        module = ConvPlus2d(channels, kernel_size=window, heads=heads, proj=False, backend=backend)
        cases[f"Conv+ mixer, backend '{backend}'"] = lambda m=module: m(x)
    qkv = [torch.randn(batch, heads, channels // heads, side, side, requires_grad=True) for _ in range(3)]
    cases[ATTENTION] = lambda: cpu.attend(*qkv, Neighborhood.of((window,) * 2, (1, 1)))
    cases[UNFOLD] = lambda: unfold_neighborhood_attention(*qkv, window)
    cases["attention term only: global SDPA"] = lambda: global_attention.attend(*qkv, Neighborhood.of(None, (1, 1)))
    return cases, qkv


def mixer_table(batch: int, channels: int, side: int, repeats: int, results: dict) -> list[str]:
    cases, qkv = mixer_cases(batch, channels, side)
    results["mixer_flops"] = batch * channels * side * side * 49 * 2  # one 49-tap multiply-add per value
    rows = [
        f"### Mixer, {batch}x{channels}x{side}x{side}, window 7, 4 heads, proj=False",
        "",
        "| case | forward (ms) | forward ratio | fwd+bwd (ms) | fwd+bwd ratio | activation memory (MiB) | "
        "peak memory fwd+bwd (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = None
    for name, fn in cases.items():
        fwd, both = _no_grad(fn, repeats), timed(fn, True, repeats)
        memory, peak = activation_bytes(fn) / 2**20, peak_bytes(fn, True) / 2**20
        base = base or (fwd, both)
        results[name] = (fwd, both)
        if name == CONVPLUS:  # the target ratios, each Conv+ call timed next to a baseline call
            with torch.no_grad():
                results["paired_forward"] = paired_ratio(cases[DWCONV], fn, False, 4 * repeats)
            results["paired_both"] = paired_ratio(cases[DWCONV], fn, True, 4 * repeats)
        rows.append(
            f"| {name} | {fwd * 1e3:.1f} | {fwd / base[0]:.2f}x | {both * 1e3:.1f} | {both / base[1]:.2f}x | "
            f"{memory:.0f} | {peak:.0f} |"
        )
        print(rows[-1], flush=True)
    # FlexAttention (and NATTEN, which runs on it) has no backward on CPU: forward only, on inputs without grad
    plain = [t.detach() for t in qkv]
    for name, make in (
        (FLEX, lambda: flex_neighborhood_attention(7, side, side)),
        (NATTEN, lambda: natten_neighborhood_attention(7)),
    ):
        try:
            peer = make()
            fwd = _no_grad(lambda peer=peer: peer(*plain), repeats)
            results[name] = (fwd, math.nan)
            rows.append(f"| {name} | {fwd * 1e3:.1f} | {fwd / base[0]:.2f}x | no CPU backward | — | — | — |")
        except Exception as error:  # report why it could not run instead of failing the suite
            rows.append(f"| {name} | could not run: {type(error).__name__}: {str(error).splitlines()[0][:120]} |")
        print(rows[-1], flush=True)
    rows += [
        "",
        "Activation memory: the output plus the distinct tensors saved for backward (what a training step keeps). "
        "Peak memory: the most PyTorch's allocator held at once during one forward+backward, above what it held "
        "before (the profiler's allocation events).",
        "The unfold baseline zero-pads the border keys and NATTEN shifts its windows inward at the borders, where "
        "Conv+ excludes the keys outside the grid; they are speed peers only. NATTEN is natten "
        f"{package_version('natten')} (`make bench` installs it without CUDA kernels: on CPU it runs Flex "
        "Attention, and compiles it only on CUDA devices).",
    ]
    return rows


def stage_table(stages: list[tuple[int, int]], batch: int, repeats: int, rates: tuple[float, float]) -> list[str]:
    rows = [
        "| stage (C x H x W) | dwconv fwd (ms) | Conv+ fwd ratio | dwconv fwd+bwd (ms) | Conv+ fwd+bwd ratio | "
        "dwconv fwd GFLOP/s | Conv+ fwd GFLOP/s | Conv+ fwd GB/s | peak memory fwd+bwd, dwconv / Conv+ (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for channels, side in stages:
        cases, _ = mixer_cases(batch, channels, side)
        dw, cp = cases[DWCONV], cases[CONVPLUS]
        dw_f, cp_f = _no_grad(dw, repeats), _no_grad(cp, repeats)
        dw_b, cp_b = timed(dw, True, repeats), timed(cp, True, repeats)
        dw_m, cp_m = peak_bytes(dw, True) / 2**20, peak_bytes(cp, True) / 2**20
        n = batch * channels * side * side
        flops = n * 49 * 2  # one 49-tap multiply-add per value; Conv+ has three (scores, aggregation, conv term)
        bytes_moved = n * 4 * 2  # read x (with proj=False also Conv+'s features), write the output
        rows.append(
            f"| {channels}x{side}x{side} | {dw_f * 1e3:.2f} | {cp_f / dw_f:.2f}x | {dw_b * 1e3:.2f} | "
            f"{cp_b / dw_b:.2f}x | {flops / dw_f / 1e9:.1f} | {3 * flops / cp_f / 1e9:.1f} | "
            f"{bytes_moved / cp_f / 1e9:.1f} | {dw_m:.0f} / {cp_m:.0f} |"
        )
        print(rows[-1], flush=True)
    rows += [
        "",
        f"Machine ceilings measured in the same run: float32 matmul {rates[0]:.0f} GFLOP/s, copy {rates[1]:.1f} GB/s. "
        "FLOPs count the 49-tap multiply-adds per value (dwconv one; Conv+ three: scores, aggregation, conv term); "
        "bytes the compulsory traffic (input read once, output written once). Peak memory as in the mixer table.",
    ]
    return rows


def model_table(batch: int, side: int, repeats: int, results: dict) -> list[str]:
    rows = ["| model | inference (ms) | ratio | train step (ms) | ratio |", "|---|---|---|---|---|"]
    base = None
    for name in ("convnextv2_atto", "convplus_convnextv2_atto"):
        torch.manual_seed(0)
        model = timm.create_model(name)
        x = torch.randn(batch, 3, side, side)
        optimizer = torch.optim.AdamW(model.parameters())
        model.eval()
        infer = _no_grad(lambda m=model, x=x: m(x), repeats)
        model.train()

        def step(m=model, opt=optimizer, x=x):
            opt.zero_grad()
            loss = m(x).logsumexp(1).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        train_step = timed(step, False, repeats)
        base = base or (infer, train_step)
        results[name] = (infer, train_step)
        rows.append(
            f"| {name} | {infer * 1e3:.0f} | {infer / base[0]:.2f}x | {train_step * 1e3:.0f} | "
            f"{train_step / base[1]:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def scaling(sides: list[int], repeats: int, path: Path, results: dict) -> list[str]:
    """Forward time and forward+backward peak memory vs positions for dwconv, Conv+ local (C++ kernel) and Conv+
    global (SDPA), 1x16 channels; a two-panel PNG."""
    names = ("dwconv 7x7", "Conv+ local (window 7)", "Conv+ global")
    times: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    memory: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for side in sides:
        cases, _ = mixer_cases(1, 16, side)
        glob = ConvPlus2d(16, kernel_size=7, window=None, heads=4, proj=False)
        x = torch.randn(1, 16, side, side, requires_grad=True)
        runs = {names[0]: cases[DWCONV], names[1]: cases[CONVPLUS]}
        if side <= 128:  # global attention's N x N work grows quadratically
            runs[names[2]] = lambda g=glob, x=x: g(x)
        for name, fn in runs.items():
            times[name].append((side * side, _no_grad(fn, repeats)))
            memory[name].append((side * side, peak_bytes(fn, True)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, curves, scale, label in (
        (axes[0], times, 1e3, "forward time (ms)"),
        (axes[1], memory, 2**-20, "peak memory, forward+backward (MiB)"),
    ):
        for name, points in curves.items():
            ax.loglog([n for n, _ in points], [v * scale for _, v in points], "o-", label=name)
        ax.set(xlabel="positions N (grid side^2)", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("Scaling with image size (batch 1, 16 channels, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    rows = [
        "| grid | "
        + " | ".join(f"{name} (ms)" for name in names)
        + " | "
        + " | ".join(f"{name} (MiB)" for name in names)
        + " |",
        "|---|" + "---|" * 2 * len(names),
    ]
    for i, side in enumerate(sides):
        cells = [f"{pts[i][1] * 1e3:.2f}" if i < len(pts) else "—" for pts in times.values()]
        cells += [f"{pts[i][1] / 2**20:.1f}" if i < len(pts) else "—" for pts in memory.values()]
        rows.append(f"| {side}x{side} | " + " | ".join(cells) + " |")
    exponents = {name: fitted_exponent(points[1:]) for name, points in times.items()}
    memory_exponents = {name: fitted_exponent(points[1:]) for name, points in memory.items()}
    results["scaling"], results["scaling_memory"] = exponents, memory_exponents
    local = times[names[1]]
    results["scaling_steps"] = [b[1] / a[1] for a, b in itertools.pairwise(local)]  # growth per 4x positions
    fits = ", ".join(f"{name} p = {p:.2f}" for name, p in exponents.items())
    memory_fits = ", ".join(f"{name} p = {p:.2f}" for name, p in memory_exponents.items())
    rows += [
        "",
        "Time: forward, median of the repeats. Memory: the peak PyTorch's allocator held during one forward+backward.",
        f"Fitted time ~ N^p from the second size on: {fits}. Fitted peak memory ~ N^p: {memory_fits}.",
    ]
    return rows


def paired(ratio: tuple[float, float, float]) -> str:
    """A paired_ratio result as 'median (lowest-highest)'."""
    return f"{ratio[0]:.2f}x paired median ({ratio[1]:.2f}x-{ratio[2]:.2f}x)"


def targets(results: dict) -> list[str]:
    """The CPU speed targets, met or not, from the numbers measured above."""
    dw, cp, att, unf = (results[k] for k in (DWCONV, CONVPLUS, ATTENTION, UNFOLD))
    plain, plus = results["convnextv2_atto"], results["convplus_convnextv2_atto"]
    local_p, steps = results["scaling"]["Conv+ local (window 7)"], results["scaling_steps"]
    local_memory_p = results["scaling_memory"]["Conv+ local (window 7)"]
    rows = [
        (
            "mixer forward <= 6x depthwise conv",
            f"{paired(results['paired_forward'])}; table {cp[0] / dw[0]:.2f}x",
            results["paired_forward"][0] <= 6,
        ),
        (
            "mixer forward+backward <= 2.5x depthwise conv",
            f"{paired(results['paired_both'])}; table {cp[1] / dw[1]:.2f}x",
            results["paired_both"][0] <= 2.5,
        ),
        (
            ">= 5x faster than unfold neighborhood attention",
            f"attention term {unf[0] / att[0]:.1f}x (forward), {unf[1] / att[1]:.1f}x (fwd+bwd); whole mixer "
            f"{unf[0] / cp[0]:.1f}x, {unf[1] / cp[1]:.1f}x",
            min(unf[0] / att[0], unf[1] / att[1]) >= 5,
        ),
    ]
    for name, peer in (("FlexAttention", FLEX), ("NATTEN", NATTEN)):
        if peer in results:
            fwd = results[peer][0]
            rows.append(
                (
                    f"faster than {name}",
                    f"attention term {fwd / att[0]:.0f}x faster (forward; no CPU backward)",
                    att[0] < fwd,
                )
            )
        else:
            rows.append((f"faster than {name}", "could not run (see the mixer table)", None))
    rows += [
        ("whole model train step <= 1.5x plain atto", f"{plus[1] / plain[1]:.2f}x", plus[1] / plain[1] <= 1.5),
        ("whole model inference <= 2x plain atto", f"{plus[0] / plain[0]:.2f}x", plus[0] / plain[0] <= 2),
        (
            "linear in image size (windowed Conv+)",
            f"time ~ N^{local_p:.2f}; each 4x more positions costs {', '.join(f'{r:.1f}x' for r in steps)}; "
            f"peak memory ~ N^{local_memory_p:.2f}",
            max(steps) <= 5 and local_memory_p <= 1.1,
        ),
    ]
    verdict = {True: "yes", False: "**no**", None: "unknown"}
    lines = ["| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict[met]} |" for name, value, met in rows]
    mixer_flops = results["mixer_flops"]
    lines += [
        "",
        f"Rates on the mixer shape: the depthwise conv forward runs at {mixer_flops / dw[0] / 1e9:.0f} GFLOP/s "
        f"(oneDNN), the Conv+ mixer at {3 * mixer_flops / cp[0] / 1e9:.0f} GFLOP/s counting its three 49-tap "
        "multiply-adds (scores, aggregation, conv term) and not the softmax; the arithmetic floor of the forward "
        "ratio is about 3x.",
        "",
        f"The mixer targets are judged on paired ratios: {4 * results['repeats']} pairs, each Conv+ call timed right "
        "after a depthwise conv call, so that both see the same machine state (the baseline alone moves from run "
        "to run on a shared machine); 'table' is the ratio of the two medians in the mixer table.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer cases")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc settings")
    args = parser.parse_args()
    if not args.default_malloc:
        with_retaining_malloc()
    malloc = (
        "glibc malloc with " + ", ".join(f"{k}={os.environ[k]}" for k in RETAINING_MALLOC)
        if all(k in os.environ for k in RETAINING_MALLOC)
        else "the default malloc settings"
    )
    torch.set_num_threads(args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cpu.extension()  # build outside the timings
    mixer_batch, batch = (2, 2) if args.quick else (8, 16)
    rates = machine_rates(args.repeats)
    results: dict = {"repeats": args.repeats}
    flags = (" --quick" if args.quick else "") + (" --default-malloc" if args.default_malloc else "")
    command = f"python benchmarks/run.py{flags} --threads {args.threads}"
    sections = [
        "# Performance",
        "",
        f"Command: `{command}` on {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{args.threads} thread(s), torch {torch.__version__}, {malloc}, {date.today().isoformat()}. "
        f"Times are medians of {args.repeats} repeats after a warm-up; ratios are against the first row of "
        "each table, timed in the same run. Conv+ runs the fused C++ kernel (backend 'cpu', what 'auto' picks "
        "on CPU): the 'direct' score, attention term, gain, depthwise conv term and bias in one pass over the "
        "window.",
        "",
        "**No GPU timings:** this suite was run on a machine without a GPU. The Triton kernels "
        "(`backend='triton'`, what 'auto' picks on CUDA) are checked for correctness only, in Triton's CPU "
        "interpreter (tests/test_triton.py); their timings against cuDNN, FlexAttention and NATTEN are not "
        "measured yet.",
        "",
        *mixer_table(mixer_batch, 64, 56, args.repeats, results),
        "",
        f"### ConvNeXt V2 atto stage shapes at 224x224, batch {batch}",
        "",
        *stage_table(ATTO_STAGES, batch, args.repeats, rates),
        "",
    ]
    if not args.quick:
        sections += [
            f"### ConvNeXt V2 tiny stage shapes, batch {batch}",
            "",
            *stage_table(TINY_STAGES, batch, args.repeats, rates),
            "",
        ]
    sections += [
        f"### Whole model at 224x224, batch {batch} (train step: forward, backward, AdamW step)",
        "",
        *model_table(batch, 224, args.repeats, results),
        "",
        "### Scaling (batch 1, 16 channels)",
        "",
        *scaling(
            [32, 64, 128, 256, 512] if not args.quick else [32, 64, 128],
            args.repeats,
            args.output.parent / "scaling.png",
            results,
        ),
        "",
        "![scaling](scaling.png)",
        "",
        "## Against the targets (CPU)",
        "",
        *targets(results),
        "",
    ]
    args.output.write_text("\n".join(sections) + "\n")
    print("\n".join(targets(results)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
