"""The Conv+ speed suite (``make bench``): every figure is a ratio against a baseline timed in the same run, in
the memory layout the model feeds it. Writes docs/performance.md (ending with the speed targets, measured and
judged by the suite) and docs/scaling.png.

    python benchmarks/run.py [--quick] [--threads N] [--pairs 15] [--default-malloc] [--no-compile]

The depthwise-conv baseline runs on channels-last input, as every ``conv_dw`` of timm's ConvNeXt V2 receives it
(the suite checks this with a hook and says so in its header), and Conv+ is fed the same tensor; the NCHW
figures are reported beside them. Ratios are paired: each Conv+ call is timed right after a baseline call, so
that both see the same machine state, and the median and range of the pairs are given.

On Linux the suite re-runs itself with glibc's malloc set to keep freed memory (``RETAINING_MALLOC``), as
jemalloc and tcmalloc do and as PyTorch's CPU tuning guide advises: with the default settings every large
tensor is freshly mapped memory, and its page faults, which vary from run to run on a VM, cost more than
the depthwise conv baseline itself. ``--default-malloc`` measures with the default settings instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
from deployment import compiled_ratios, onnx_breakdown, onnx_ratios
from measure import Paired, fitted_exponent, paired_ratio, peak_bytes, timed, train_step
from model_split import model_split
from profile_table import profile_section

import convplus  # noqa: F401
from convplus import ConvPlus2d
from convplus.backends import cpu, global_attention
from convplus.info import cpu_model, package_version
from convplus.models.registry import STAGE_CONFIGS
from convplus.neighborhood import Neighborhood

ATTO_STAGES = [(40, 56), (80, 28), (160, 14), (320, 7)]
TINY_STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]
LAYOUTS = {"channels-last": torch.channels_last, "NCHW": torch.contiguous_format}
BASELINE_LAYOUT = "channels-last"
INFERENCE_BOUND = 1.10  # the whole-model inference target: Conv+ atto over plain atto
RETAINING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
PEER_NOTE = (
    "forward only: FlexAttention has no CPU backward, and on CPU there is no fused implementation of it (NATTEN "
    "runs FlexAttention there, uncompiled); a speed peer, not a target"
)


def with_retaining_malloc() -> None:
    """Re-execute this script with RETAINING_MALLOC in the environment unless it is there (glibc reads it at
    start-up only)."""
    if platform.system() == "Linux" and any(os.environ.get(k) != v for k, v in RETAINING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINING_MALLOC})


def _no_grad(fn: Callable, repeats: int) -> float:
    with torch.no_grad():
        return timed(fn, False, repeats)


def _paired_no_grad(base: Callable, fn: Callable, pairs: int) -> Paired:
    with torch.no_grad():
        return paired_ratio(base, fn, False, pairs)


def layout_of(x: torch.Tensor) -> str:
    """'NCHW', 'channels-last' or 'other' for a 4-d tensor."""
    if x.is_contiguous():
        return "NCHW"
    return "channels-last" if x.is_contiguous(memory_format=torch.channels_last) else "other"


def dwconv_input_layouts(name: str) -> dict[str, int]:
    """How many of the model's ``conv_dw`` layers receive each layout, hooked during one forward of an NCHW
    image batch."""
    model = timm.create_model(name).eval()
    seen: dict[str, int] = {}

    def hook(module, args):
        seen[layout_of(args[0])] = seen.get(layout_of(args[0]), 0) + 1

    for module in model.modules():
        if hasattr(module, "conv_dw"):
            module.conv_dw.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    return seen


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


def depthwise_and_convplus(
    batch: int, channels: int, side: int, layout: str, mixer_config: dict | None = None
) -> tuple[Callable, Callable]:
    """The baseline depthwise conv 7x7 and a Conv+ mixer (``mixer_config``: ConvPlus2d's keyword arguments; by
    default a 7x7 window on the fused CPU kernel, 4 heads, proj=False), each a callable running on the same input
    of ``layout`` that requires grad."""
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
    dw = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    mixer = ConvPlus2d(channels, **(mixer_config or {"kernel_size": 7, "heads": 4, "proj": False, "backend": "cpu"}))
    return (lambda: dw(x)), (lambda: mixer(x))


def stage_mixer(stage: int) -> tuple[dict, str]:
    """The Conv+ settings of stage ``stage`` of the registered convplus_convnextv2 models (``STAGE_CONFIGS``,
    backend 'auto' as there) and how the tables name its attention."""
    config = STAGE_CONFIGS[stage]
    window = config["window"]
    return config, "global" if window is None else f"window {window}"


def mixer_table(batch: int, channels: int, side: int, pairs: int, results: dict) -> list[str]:
    """The mixer shape: Conv+ and its peers against the channels-last depthwise conv."""
    repeats = max(3, pairs // 3)
    dw, conv_plus = depthwise_and_convplus(batch, channels, side, BASELINE_LAYOUT)
    dw_nchw, conv_plus_nchw = depthwise_and_convplus(batch, channels, side, "NCHW")
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    local = ConvPlus2d(channels, kernel_size=7, heads=4, proj=False, backend="local")
    qkv = [torch.randn(batch, 4, channels // 4, side, side, requires_grad=True) for _ in range(3)]
    cases = {
        "depthwise conv 7x7, channels-last (baseline)": dw,
        "depthwise conv 7x7, NCHW": dw_nchw,
        "Conv+ mixer, backend 'cpu', channels-last": conv_plus,
        "Conv+ mixer, backend 'cpu', NCHW": conv_plus_nchw,
        "Conv+ mixer, backend 'local' (PyTorch loop), channels-last": lambda: local(x),
        "attention term only: fused C++ kernel": lambda: cpu.attend(*qkv, Neighborhood.of((7, 7), (1, 1))),
        "attention term only: unfold neighborhood attention": lambda: unfold_neighborhood_attention(*qkv, 7),
        "attention term only: global SDPA": lambda: global_attention.attend(*qkv, Neighborhood.of(None, (1, 1))),
    }
    results["mixer"] = {
        "forward NCHW": _paired_no_grad(dw_nchw, conv_plus_nchw, pairs),
        "both NCHW": paired_ratio(dw_nchw, conv_plus_nchw, True, pairs),
        "flops": batch * channels * side * side * 49 * 2,  # one 49-tap multiply-add per value
        "shape": f"{batch}x{channels}x{side}x{side}",
    }
    rows = [
        f"### Mixer, {batch}x{channels}x{side}x{side}, window 7, 4 heads, proj=False",
        "",
        "| case | forward (ms) | forward ratio | fwd+bwd (ms) | fwd+bwd ratio | activation memory (MiB) | "
        "peak memory fwd+bwd (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fn in cases.items():
        fwd, both = _no_grad(fn, repeats), timed(fn, True, repeats)
        memory, peak = activation_bytes(fn) / 2**20, peak_bytes(fn, True) / 2**20
        results["mixer"][name] = (fwd, both)
        ratios = ("1.00x", "1.00x") if fn is dw else (_paired_no_grad(dw, fn, pairs), paired_ratio(dw, fn, True, pairs))
        if fn is conv_plus:
            results["mixer"]["forward"], results["mixer"]["both"] = ratios
        rows.append(
            f"| {name} | {fwd * 1e3:.1f} | {ratios[0]} | {both * 1e3:.1f} | {ratios[1]} | {memory:.0f} | {peak:.0f} |"
        )
        print(rows[-1], flush=True)
    plain = [t.detach() for t in qkv]
    peers = {
        "attention term only: FlexAttention (compiled, block mask)": lambda: flex_neighborhood_attention(7, side, side),
        "attention term only: NATTEN na2d (Flex backend, uncompiled on CPU)": lambda: natten_neighborhood_attention(7),
    }
    for name, make in peers.items():
        try:
            peer = make()
            call = functools.partial(peer, *plain)
            fwd, ratio = _no_grad(call, repeats), _paired_no_grad(dw, call, repeats)
            rows.append(f"| {name} | {fwd * 1e3:.1f} | {ratio} | {PEER_NOTE} | — | — | — |")
        except Exception as error:  # report why it could not run instead of failing the suite
            rows.append(f"| {name} | could not run: {type(error).__name__}: {str(error).splitlines()[0][:120]} |")
        print(rows[-1], flush=True)
    mixer = results["mixer"]
    rows += [
        "",
        f"Times: medians of {repeats} repeats. Ratios: median (lowest-highest) of paired calls, each case timed right "
        f"after the channels-last depthwise conv, {pairs} pairs ({repeats} for the two forward-only peers). Conv+ "
        f"in NCHW over the depthwise conv in NCHW, paired the same way: forward {mixer['forward NCHW']}, "
        f"forward+backward {mixer['both NCHW']}.",
        "Activation memory: the output plus the distinct tensors saved for backward (what a training step keeps). "
        "Peak memory: the most PyTorch's allocator held at once during one forward+backward, above what it held "
        "before (the profiler's allocation events).",
        "The unfold baseline zero-pads the border keys and NATTEN shifts its windows inward at the borders, where "
        "Conv+ excludes the keys outside the grid; they are speed peers only. NATTEN is natten "
        f"{package_version('natten')}, installed without CUDA kernels.",
    ]
    return rows


def stage_table(stages: list[tuple[int, int]], batch: int, pairs: int, results: dict) -> list[str]:
    """Conv+ over the depthwise conv at each stage shape, paired, channels-last (the model's layout) and NCHW; each
    stage's Conv+ mixer configured as the registered model configures that stage (``stage_mixer``)."""
    rows = [
        "| stage (C x H x W) | Conv+ attention | dwconv fwd, channels-last (ms) | Conv+ fwd ratio | dwconv fwd+bwd, "
        "channels-last (ms) | Conv+ fwd+bwd ratio | NCHW: Conv+ fwd ratio | NCHW: Conv+ fwd+bwd ratio | dwconv NCHW / "
        "channels-last, fwd · fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, (channels, side) in enumerate(stages):
        config, attention = stage_mixer(stage)
        measured = {}
        for layout in LAYOUTS:
            dw, conv_plus = depthwise_and_convplus(batch, channels, side, layout, config)
            measured[layout] = (
                _paired_no_grad(dw, conv_plus, pairs),
                paired_ratio(dw, conv_plus, True, pairs),
                _no_grad(dw, pairs),
                timed(dw, True, pairs),
            )
        fwd, both, dw_fwd, dw_both = measured[BASELINE_LAYOUT]
        nchw = measured["NCHW"]
        results.setdefault("stages", {})[f"{channels}x{side}x{side}"] = (fwd, both)
        rows.append(
            f"| {channels}x{side}x{side} | {attention} | {dw_fwd * 1e3:.2f} | {fwd} | {dw_both * 1e3:.2f} | {both} | "
            f"{nchw[0].median:.2f}x | {nchw[1].median:.2f}x | {nchw[2] / dw_fwd:.2f}x · {nchw[3] / dw_both:.2f}x |"
        )
        print(rows[-1], flush=True)
    rows += [
        "",
        f"Ratios: median (lowest-highest) of {pairs} pairs, Conv+ over the depthwise conv fed the same tensor. "
        "Baseline times: medians of as many repeats. Each stage's Conv+ layer is the one the registered "
        "convplus_convnextv2 models put there: a 7x7 window (the fused C++ kernel) in stages 0-2, global attention "
        "(backend 'global': the depthwise conv term by oneDNN, scores, softmax and weighted sum in one C++ pass) in "
        "the last.",
    ]
    return rows


def model_table(batch: int, side: int, pairs: int, results: dict) -> list[str]:
    """convplus_convnextv2_atto over convnextv2_atto, both channels-last: inference and train step, float32 and
    under bfloat16 autocast, paired."""
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    models = {}
    for name in ("convnextv2_atto", "convplus_convnextv2_atto"):
        torch.manual_seed(0)
        models[name] = timm.create_model(name).to(memory_format=torch.channels_last)
    plain, plus = models.values()
    rows = [
        "| precision | plain inference (ms) | Conv+ inference ratio | plain train step (ms) | Conv+ train step ratio |",
        "|---|---|---|---|---|",
    ]
    settings = (("float32", None, pairs), ("bfloat16 autocast", torch.bfloat16, max(3, pairs // 3)))
    for precision, dtype, count in settings:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            plain.eval(), plus.eval()
            infer = _paired_no_grad(lambda: plain(x), lambda: plus(x), count)
            plain_infer = _no_grad(lambda: plain(x), count)
            plain.train(), plus.train()
            plain_step, plus_step = train_step(plain, x), train_step(plus, x)
            step = paired_ratio(plain_step, plus_step, False, count)
            plain_step_time = timed(plain_step, False, count)
        results.setdefault("model", {})[precision] = (infer, step)
        rows.append(f"| {precision} | {plain_infer * 1e3:.0f} | {infer} | {plain_step_time * 1e3:.0f} | {step} |")
        print(rows[-1], flush=True)
    rows += [
        "",
        f"Both models and their input are channels-last. Ratios: median (lowest-highest) of paired calls ({pairs} "
        f"pairs in float32, {max(3, pairs // 3)} under autocast).",
    ]
    return rows


def scaling(sides: list[int], repeats: int, path: Path, results: dict) -> list[str]:
    """Forward time (median of ``repeats`` calls, three times as many for the two windowed layers) and
    forward+backward peak memory vs positions for dwconv, Conv+ local (C++ kernel) and Conv+ global (SDPA), 1x16
    channels, channels-last; a two-panel PNG."""
    names = ("dwconv 7x7", "Conv+ local (window 7)", "Conv+ global")
    times: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    memory: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    runs = {}
    for side in sides:
        dw, conv_plus = depthwise_and_convplus(1, 16, side, BASELINE_LAYOUT)
        glob = ConvPlus2d(16, kernel_size=7, window=None, heads=4, proj=False)
        x = torch.randn(1, 16, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        runs[side] = {names[0]: dw, names[1]: conv_plus}
        if side <= 128:  # global attention's N x N work grows quadratically
            runs[side][names[2]] = lambda g=glob, x=x: g(x)
    # every time first: the memory runs (global attention's peak reaches GBs) leave the system reclaiming memory
    # for a while, which slowed the next time measured
    for side, by_name in runs.items():
        for name, fn in by_name.items():  # the windowed layers' times are short and noisy: three times the repeats
            times[name].append((side * side, _no_grad(fn, repeats if name == names[2] else 3 * repeats)))
    for side, by_name in runs.items():
        for name, fn in by_name.items():
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
    fig.suptitle("Scaling with image size (batch 1, 16 channels, channels-last, CPU)")
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
    local = times[names[1]]
    results["scaling"] = {
        "time": exponents[names[1]],
        "memory": memory_exponents[names[1]],
        "steps": [b[1] / a[1] for a, b in itertools.pairwise(local)],  # growth per 4x positions
    }
    fits = ", ".join(f"{name} p = {p:.2f}" for name, p in exponents.items())
    memory_fits = ", ".join(f"{name} p = {p:.2f}" for name, p in memory_exponents.items())
    rows += [
        "",
        f"Time: forward, median of {3 * repeats} calls ({repeats} for global attention), all timed before any "
        "memory is measured. Memory: the peak PyTorch's allocator held during one forward+backward.",
        f"Fitted time ~ N^p from the second size on: {fits}. Fitted peak memory ~ N^p: {memory_fits}.",
    ]
    return rows


def targets(results: dict) -> list[str]:
    """The CPU speed targets from the numbers measured above: (target, measured, met) rows, met None when the
    figure is missing. Every Conv+ ratio is against a baseline in the layout the model runs."""
    rows: list[tuple[str, str, bool | None]] = []

    def at_most(name: str, value: Paired | float | None, bound: float) -> None:
        if value is None:
            rows.append((name, "not measured (see above)", None))
            return
        median = value.median if isinstance(value, Paired) else value
        shown = str(value) if isinstance(value, Paired) else f"{value:.2f}"
        rows.append((name, shown, median <= bound))

    mixer = results["mixer"]
    at_most(f"mixer {mixer['shape']} forward <= 3.5x depthwise conv (channels-last)", mixer["forward"], 3.5)
    at_most(f"mixer {mixer['shape']} forward+backward <= 1.5x depthwise conv (channels-last)", mixer["both"], 1.5)
    for stage, (fwd, both) in results["stages"].items():
        at_most(f"stage {stage} forward <= 4x depthwise conv (channels-last)", fwd, 4)
        at_most(f"stage {stage} forward+backward <= 2x depthwise conv (channels-last)", both, 2)
    infer, step = results["model"]["float32"]
    at_most(
        f"whole model inference <= {INFERENCE_BOUND:.2f}x convnextv2_atto (both channels-last)", infer, INFERENCE_BOUND
    )
    at_most("whole model train step <= 1.15x convnextv2_atto (both channels-last)", step, 1.15)
    onnx = results.get("onnx", {})
    at_most("onnxruntime convplus / plain atto <= 1.5x (batch 1, 2 threads)", onnx.get("ratio"), 1.5)
    at_most("ONNX export of convplus_convnextv2_atto <= 30 s", onnx.get("export seconds"), 30)
    scale = results["scaling"]
    rows.append(
        (
            "linear in image size (windowed Conv+)",
            f"time ~ N^{scale['time']:.2f}; each 4x more positions costs "
            f"{', '.join(f'{r:.1f}x' for r in scale['steps'])}; peak memory ~ N^{scale['memory']:.2f}",
            max(scale["steps"]) <= 5 and scale["memory"] <= 1.1,
        )
    )
    verdict = {True: "yes", False: "**no**", None: "unknown"}
    lines = ["| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict[met]} |" for name, value, met in rows]
    infer16, step16 = results["model"]["bfloat16 autocast"]
    flops, conv_plus = mixer["flops"], mixer["Conv+ mixer, backend 'cpu', channels-last"][0]
    dw = mixer["depthwise conv 7x7, channels-last (baseline)"][0]
    lines += [
        "",
        "Reported without a target: under bfloat16 autocast, Conv+ atto over plain atto "
        f"{infer16} (inference), {step16} (train step); " + results.get("compile summary", "torch.compile: skipped."),
        "",
        f"Rates on the mixer shape: the channels-last depthwise conv forward runs at {flops / dw / 1e9:.0f} GFLOP/s "
        f"(oneDNN), the Conv+ mixer at {3 * flops / conv_plus / 1e9:.0f} GFLOP/s counting its three 49-tap "
        "multiply-adds (scores, aggregation, conv term) and not the softmax; the arithmetic floor of the forward "
        "ratio is about 3x. FlexAttention and NATTEN are forward-only speed peers on CPU, not targets.",
    ]
    return lines


def gpu_section() -> list[str]:
    """What this suite says about GPUs: it times CPUs only."""
    if torch.cuda.is_available():
        seen = f"This run saw {torch.cuda.get_device_name(0)}, but the suite times CPU code only"
    else:
        seen = "No GPU was available to this run"
    return [
        "## GPU",
        "",
        f"**GPU figures are missing.** {seen}: the Triton kernels (`backend='triton'`, what 'auto' picks on CUDA) "
        "are checked for correctness (tests/test_triton.py, in Triton's CPU interpreter where there is no GPU), but "
        "their speed against cuDNN's depthwise conv, compiled FlexAttention and NATTEN's fused kernels has not been "
        "measured.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer cases (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pairs", type=int, default=15, help="paired calls per ratio")
    parser.add_argument("--output", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile ratios")
    args = parser.parse_args()
    if not args.default_malloc:
        with_retaining_malloc()
    malloc = (
        "glibc malloc with " + ", ".join(f"{k}={os.environ[k]}" for k in RETAINING_MALLOC)
        if all(k in os.environ for k in RETAINING_MALLOC)
        else "glibc malloc, default settings"
    )
    torch.set_num_threads(args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cpu.extension()  # build outside the timings
    mixer_batch, batch, side = (2, 2, 64) if args.quick else (8, 16, 224)
    rates = machine_rates(5)
    layouts = dwconv_input_layouts("convnextv2_atto")
    results: dict = {}
    flags = (" --quick" if args.quick else "") + (" --default-malloc" if args.default_malloc else "")
    flags += " --no-compile" if args.no_compile else ""
    command = f"python benchmarks/run.py{flags} --threads {args.threads} --pairs {args.pairs}"
    sides = [32, 64, 128] if args.quick else [32, 64, 128, 256, 512]
    stage_sets = [("atto", ATTO_STAGES)] + ([] if args.quick else [("tiny", TINY_STAGES)])
    sections = [
        "## CPU",
        "",
        *mixer_table(mixer_batch, 64, 56, args.pairs, results),
        "",
    ]
    for name, stages in stage_sets:
        sections += [
            f"### ConvNeXt V2 {name} stage shapes at 224x224, batch {batch}",
            "",
            *stage_table(stages, batch, args.pairs, results),
            "",
        ]
    sections += [
        f"### Whole model at {side}x{side}, batch {batch} (train step: forward, backward, AdamW step)",
        "",
        *model_table(batch, side, args.pairs, results),
        "",
        "Inside the float32 inference:",
        "",
        *model_split(batch, side, args.pairs, INFERENCE_BOUND),
        "",
        "### Exported and compiled",
        "",
        *onnx_ratios(side, args.pairs, results),
        "",
        "Where the exported Conv+ atto's extra time goes:",
        "",
        *onnx_breakdown(side, args.pairs),
        "",
        *([] if args.no_compile else compiled_ratios(batch, side, max(5, args.pairs // 2), results)),
        "",
        "### Scaling (batch 1, 16 channels)",
        "",
        *scaling(sides, 5, args.output.parent / "scaling.png", results),
        "",
        "![scaling](scaling.png)",
        "",
        "### Where the time goes",
        "",
        *profile_section(mixer_batch, batch),
        "",
        "## Against the targets (CPU)",
        "",
        *targets(results),
        "",
        *gpu_section(),
        "",
    ]
    end_rates = machine_rates(5)
    header = [
        "# Performance",
        "",
        f"Command: `{command}`, {date.today().isoformat()}.",
        "",
        f"- CPU: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores visible); {args.threads} thread(s) "
        f"(torch.get_num_threads); allocator: {malloc}; torch {torch.__version__}, timm {package_version('timm')}.",
        "- Machine ceilings measured at the start and at the end of this run: float32 matmul "
        f"{rates[0]:.0f} and {end_rates[0]:.0f} GFLOP/s, copy {rates[1]:.1f} and {end_rates[1]:.1f} GB/s (other work "
        "on this shared machine lowers them; two that differ show that the conditions changed during the run).",
        "- Layout: every `conv_dw` of timm's convnextv2_atto, hooked during a forward of an NCHW image, receives "
        + ", ".join(f"{layout} input ({count} layers)" for layout, count in layouts.items())
        + ". The depthwise-conv baseline is therefore timed channels-last, and Conv+ is fed the same tensor; "
        "NCHW figures stand beside them.",
        "- Conv+ runs the fused C++ kernel (backend 'cpu', what 'auto' picks on CPU for a window): the 'direct' score, "
        "attention term, gain, depthwise conv term and bias in one pass over the window. The models' global last "
        "stage runs backend 'global' (what 'auto' picks there): its depthwise conv term by oneDNN, and on these "
        "small grids the 'direct' score, softmax and weighted sum of each head in one C++ pass, forward and backward.",
        "",
    ]
    args.output.write_text("\n".join(header + sections) + "\n")
    print("\n".join(targets(results)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
