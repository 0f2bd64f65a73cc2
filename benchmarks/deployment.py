"""Deployed Conv+ against deployed plain ConvNeXt V2 atto for the speed suite: the ONNX export run in
onnxruntime, and ``torch.compile``. Each function returns markdown rows and records its figures in ``results``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch
from measure import paired_ratio

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
    """``torch.compile`` (inductor) of both models, channels-last, inference: compile time and paired ratio."""
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    calls, seconds = [], {}
    for name in MODELS:
        torch.manual_seed(0)
        model = torch.compile(timm.create_model(name).eval().to(memory_format=torch.channels_last))
        start = time.perf_counter()
        try:
            with torch.no_grad():
                model(x)
        except Exception as error:  # report why it could not compile instead of failing the suite
            results["compile summary"] = f"torch.compile: {name} failed ({type(error).__name__})."
            return [f"torch.compile: {name} could not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}"]
        seconds[name] = time.perf_counter() - start

        def call(model=model):
            with torch.no_grad():
                return model(x)

        calls.append(call)
    ratio = paired_ratio(*calls, False, pairs)
    results["compile summary"] = f"under torch.compile (inference, batch {batch}), Conv+ atto over plain atto {ratio}."
    return [
        f"| torch.compile (inductor), inference, batch {batch}, channels-last | plain atto | Conv+ atto |",
        "|---|---|---|",
        f"| first call (compilation), s | {seconds[MODELS[0]]:.0f} | {seconds[MODELS[1]]:.0f} |",
        f"| inference ratio, paired ({pairs} pairs) | 1.00x | {ratio} |",
    ]
