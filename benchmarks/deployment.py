"""Deployed Conv+ against deployed plain ConvNeXt V2 atto for the speed suite: the ONNX export run in
onnxruntime, and ``torch.compile``. Each function returns markdown rows and records its figures in ``results``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch
from measure import paired_ratio, train_step

from convplus.models import export_onnx

MODELS = ("convnextv2_atto", "convplus_convnextv2_atto")
ONNX_THREADS = 2


def onnx_ratios(side: int, pairs: int, results: dict) -> list[str]:
    """Export both models at batch 1 (timed), run them in onnxruntime's CPU provider with ``ONNX_THREADS``
    threads, paired; check the Conv+ graph against eager PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        return ["ONNX: not measured (onnxruntime is not installed)."]
    x = torch.randn(1, 3, side, side)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = ONNX_THREADS, 1
    # no spin-waiting worker threads: in the paired alternation, one session's spinning threads would take the
    # cores from the other's run (measured: plain atto 21.5 ms with spinning, 13.3 ms without)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
