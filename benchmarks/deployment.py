"""Deployed Conv+ against deployed plain ConvNeXt V2 atto for the speed suite: the ONNX export run in
onnxruntime, and ``torch.compile``. Each function returns markdown rows and records its figures in ``results``."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import timm
import torch
from measure import paired_ratio, train_step

from convplus.models import export_onnx, replace_convplus
from convplus.models.registry import STAGE_CONFIGS

MODELS = ("convnextv2_atto", "convplus_convnextv2_atto")
ONNX_THREADS = 2


def onnx_options(profile_prefix: Path | None = None):
    """The suite's onnxruntime session options: ``ONNX_THREADS`` intra-op threads and no spin-waiting worker threads
    (in an alternation of sessions, one session's spinning threads would take the cores from the next one's run:
    measured, plain atto 21.5 ms with spinning, 13.3 ms without); with ``profile_prefix``, onnxruntime's node
    profile, written to a file whose name starts with it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = ONNX_THREADS, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


def onnx_ratios(side: int, pairs: int, results: dict) -> list[str]:
    """Export both models at batch 1 (timed), run them in onnxruntime's CPU provider with ``ONNX_THREADS``
    threads, paired; check the Conv+ graph against eager PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        return ["ONNX: not measured (onnxruntime is not installed)."]
    x = torch.randn(1, 3, side, side)
    options = onnx_options()
    sessions, seconds, eager = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            torch.manual_seed(0)
            model = timm.create_model(name).eval()
            start = time.perf_counter()
            path = export_onnx(model, Path(folder) / f"{name}.onnx", input_shape=tuple(x.shape))
            seconds[name] = time.perf_counter() - start
            sessions[name] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            with torch.no_grad():
                eager[name] = model(x)
    feed = {"image": x.numpy()}
    runs = [lambda s=session: s.run(None, feed) for session in sessions.values()]
    ratio = paired_ratio(*runs, False, pairs)
    difference = (torch.from_numpy(runs[1]()[0]) - eager[MODELS[1]]).abs().max().item()
    results["onnx"] = {"ratio": ratio, "export seconds": seconds[MODELS[1]]}
    return [
        f"| onnxruntime {onnxruntime.__version__}, CPU, {ONNX_THREADS} threads, batch 1, {side}x{side} | plain atto "
        "| Conv+ atto |",
        "|---|---|---|",
        f"| export (`convplus.models.export_onnx`), s | {seconds[MODELS[0]]:.1f} | {seconds[MODELS[1]]:.1f} |",
        f"| inference ratio, paired ({pairs} pairs) | 1.00x | {ratio} |",
        f"| max abs difference from eager PyTorch | — | {difference:.1e} |",
    ]


def _one_stage_model(stage: int | None) -> torch.nn.Module:
    """convnextv2_atto (eval) with the registered Conv+ atto's mixer in ``stage`` alone (None: in no stage)."""
    torch.manual_seed(0)
    model = timm.create_model(MODELS[0]).eval()
    if stage is not None:
        replace_convplus(model, stages=[stage], exact=False, **STAGE_CONFIGS[stage])
    return model


def _operator_times(session, feed: dict, runs: int) -> Counter:
    """Milliseconds per run in each operator type, from the node profile of ``runs`` runs of ``session`` (made with
    profiling on) after a warm-up run."""
    for _ in range(runs + 1):
        session.run(None, feed)
    nodes = [e for e in json.loads(Path(session.end_profiling()).read_text()) if e.get("cat") == "Node"]
    per_run = len(nodes) // (runs + 1)
    times: Counter = Counter()
    for node in nodes[per_run:]:
        times[node["args"]["op_name"]] += node["dur"] / 1e3 / runs
    return times


def onnx_breakdown(side: int, rounds: int) -> list[str]:
    """Where the exported Conv+ atto's extra time goes in onnxruntime, batch 1: per stage (convnextv2_atto with the
    Conv+ mixer of one stage alone; medians of ``rounds`` runs of every model in turn, less the plain model's) and
    per operator type (onnxruntime's node profile of the plain and the Conv+ model)."""
    try:
        import onnxruntime
    except ImportError:
        return ["Not measured (onnxruntime is not installed)."]
    feed = {"image": torch.randn(1, 3, side, side).numpy()}
    whole = "Conv+ atto (every stage)"
    with tempfile.TemporaryDirectory() as folder:
        models = {"plain atto": _one_stage_model(None)}
        models |= {f"stage {s} alone": _one_stage_model(s) for s in range(len(STAGE_CONFIGS))}
        torch.manual_seed(0)
        models[whole] = timm.create_model(MODELS[1]).eval()
        paths = {
            name: export_onnx(model, Path(folder) / f"{i}.onnx", input_shape=(1, 3, side, side))
            for i, (name, model) in enumerate(models.items())
        }

        def session(name: str, profile: bool = False):
            options = onnx_options(Path(folder) / f"profile-{name}" if profile else None)
            return onnxruntime.InferenceSession(str(paths[name]), options, providers=["CPUExecutionProvider"])

        sessions = {name: session(name) for name in paths}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds + 1):  # the first round warms up
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - start)
        operators = {name: _operator_times(session(name, True), feed, rounds) for name in ("plain atto", whole)}
    ms = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
    extra = ms[whole] - ms["plain atto"]
    rows = [
        f"| onnxruntime, batch 1, {side}x{side} | ms per run | over plain atto, ms | share of Conv+ atto's extra |",
        "|---|---|---|---|",
    ]
    for name, value in ms.items():
        over = value - ms["plain atto"]
        share = "—" if name == "plain atto" else f"{over / extra:.0%}"
        rows.append(f"| {name} | {value:.2f} | {over:+.2f} | {share} |")
    plain, plus = operators.values()
    by_difference = sorted(plain.keys() | plus.keys(), key=lambda op: plain[op] - plus[op])
    rows += ["", "| operator type | plain atto, ms per run | Conv+ atto, ms per run | difference |"]
    rows.append("|---|---|---|---|")
    rows += [f"| {op} | {plain[op]:.2f} | {plus[op]:.2f} | {plus[op] - plain[op]:+.2f} |" for op in by_difference[:10]]
    if rest := by_difference[10:]:
        a, b = sum(plain[op] for op in rest), sum(plus[op] for op in rest)
        rows.append(f"| the {len(rest)} others ({', '.join(rest)}) | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return [
        *rows,
        "",
        f"Per stage: medians of {rounds} runs of each model in turn, {ONNX_THREADS} threads; a stage's model is "
        "convnextv2_atto with the registered Conv+ atto's mixer in that stage alone, so the stages' extras need not "
        "add up exactly to the whole model's. Per operator type: onnxruntime's node profile (`enable_profiling`) of "
        f"{rounds} runs after a warm-up, node times summed per operator type (with profiling on, so a little above "
        "the times unprofiled), the ten with the largest difference first.",
    ]


def compiled_ratios(batch: int, side: int, pairs: int, results: dict) -> list[str]:
    """``torch.compile`` (inductor) of both models, channels-last: the first call's time (compilation) and the
    paired ratio, for inference and for a train step (forward, backward, AdamW step)."""
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        eager = timm.create_model(name).to(memory_format=torch.channels_last)
        models[name] = (eager, torch.compile(eager))
    rows = [
        f"| torch.compile (inductor), batch {batch}, channels-last | plain atto: first call, s | Conv+ atto: "
        "first call, s | Conv+ / plain, paired |",
        "|---|---|---|---|",
    ]
    summary = []
    for mode in ("inference", "train step"):
        calls, seconds = [], []
        for name, (eager, compiled) in models.items():
            eager.train(mode == "train step")
            call = train_step(compiled, x) if mode == "train step" else _inference(compiled, x)
            start = time.perf_counter()
            try:
                call()
            except Exception as error:  # report why it could not compile instead of failing the suite
                results["compile summary"] = f"torch.compile: {name} {mode} failed ({type(error).__name__})."
                return [*rows, f"| {mode} | {name} could not run: {type(error).__name__} | — | — |"]
            seconds.append(time.perf_counter() - start)
            calls.append(call)
        ratio = paired_ratio(*calls, False, pairs)
        results.setdefault("compiled", {})[mode] = ratio
        summary.append(f"{ratio} ({mode})")
        rows.append(f"| {mode} ({pairs} pairs) | {seconds[0]:.0f} | {seconds[1]:.0f} | {ratio} |")
    plus = models[MODELS[1]][0].eval()
    with torch.no_grad():
        breaks = torch._dynamo.explain(plus)(x).graph_break_count
    results["compile summary"] = (
        f"under torch.compile, Conv+ atto over plain atto {', '.join(summary)}; graph breaks in Conv+ atto "
        f"(torch._dynamo.explain): {breaks}."
    )
    return [*rows, "", f"Graph breaks in convplus_convnextv2_atto under torch.compile (dynamo explain): {breaks}."]


def _inference(model: torch.nn.Module, x: torch.Tensor):
    def call() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return call
