"""Parameters and forward FLOPs at 224x224 of every ConvNeXt V2 size, plain vs Conv+ (docs/models.md).

FLOPs: ``convplus.flops.count_flops`` (torch.utils.flop_counter, with each Conv+ layer counted analytically),
batch 1, counted on the meta device (no real compute).

    python benchmarks/model_table.py [--output docs/models.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import convplus
from convplus.flops import count_flops
from convplus.models.registry import SIZES, STAGE_CONFIGS


def measure(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = timm.create_model(name)
        flops = count_flops(model, torch.empty(1, 3, 224, 224))
    return sum(p.numel() for p in model.parameters()), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/models.md"))
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        plain, conv_plus = measure(f"convnextv2_{size}"), measure(f"convplus_convnextv2_{size}")
        rows.append(
            f"| {size} | {plain[0] / 1e6:.2f}M | {conv_plus[0] / 1e6:.2f}M | {plain[1] / 1e9:.2f} | "
            f"{conv_plus[1] / 1e9:.2f} | {conv_plus[1] / plain[1]:.2f}x |"
        )
        print(rows[-1], flush=True)
    template = Path(__file__).with_name("models_template.md").read_text()
    stages = "\n".join(f"| {i} | {cfg} |" for i, cfg in enumerate(STAGE_CONFIGS))
    text = template.format(table="\n".join(rows), stages=stages, version=convplus.__name__, torch=torch.__version__)
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
