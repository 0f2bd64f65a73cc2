"""Scaling of the 'local' backend against 'reference': time and peak memory vs number of positions.

Each case runs in a fresh subprocess so that its peak resident memory (ru_maxrss) can be read; the
memory figure is the peak growth during forward+backward over the set-up state. Time is the median of
several repeats. Writes a markdown table (default docs/scaling.md).

    python benchmarks/local_vs_reference.py [--output docs/scaling.md] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import fitted_exponent

CHANNELS, HEADS, KERNEL, BATCH = 16, 4, 7, 1
SIDES = {"local": [32, 64, 96, 128, 192, 256], "reference": [32, 48, 64, 80]}


def run_case(backend: str, side: int, repeats: int) -> dict:
    """Measure one case in this process: median forward+backward seconds and peak RSS growth in MiB."""
    import resource
    import statistics

    from convplus import ConvPlus2d

    torch.manual_seed(0)
    module = ConvPlus2d(CHANNELS, kernel_size=KERNEL, heads=HEADS, proj=False, backend=backend)
    x = torch.randn(BATCH, CHANNELS, side, side, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/scaling.md"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", nargs=2, metavar=("BACKEND", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats)))
        return
    results: dict[str, list[tuple[int, dict]]] = {}
    for backend, sides in SIDES.items():
        for side in sides:
            out = subprocess.run(
                [sys.executable, __file__, "--case", backend, str(side), "--repeats", str(args.repeats)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results.setdefault(backend, []).append((side * side, result))
            print(f"{backend:9s} {side:4d}x{side:<4d} {result['seconds'] * 1e3:9.1f} ms {result['peak_mib']:9.1f} MiB")
    lines = [
        "# Scaling of Conv+ with the number of positions: 'local' vs 'reference'",
        "",
        f"`ConvPlus2d({CHANNELS}, kernel_size={KERNEL}, heads={HEADS}, proj=False)`, batch {BATCH}, float32, "
        "forward+backward on CPU. Time: median of "
        f"{args.repeats} repeats; memory: peak resident-set growth during those passes (fresh process per case).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {date.today().isoformat()}. Command: `python benchmarks/local_vs_reference.py`.",
        "",
        "| backend | grid | positions N | time (ms) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for backend, rows in results.items():
        for n, r in rows:
            side = math.isqrt(n)
            lines.append(f"| {backend} | {side}x{side} | {n} | {r['seconds'] * 1e3:.1f} | {r['peak_mib']:.1f} |")
    lines += ["", "Fitted exponent p of cost ~ N^p (least squares on log-log):", ""]
    for backend, rows in results.items():
        t = fitted_exponent([(n, r["seconds"]) for n, r in rows])
        m = fitted_exponent([(n, r["peak_mib"]) for n, r in rows])
        lines.append(f"- {backend}: time p = {t:.2f}, memory p = {m:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
