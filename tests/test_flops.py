"""FLOP counts of Conv+ layers are the same on every backend and device, every term counted."""

from __future__ import annotations

import pytest
import torch

from convplus import ConvPlus2d
from convplus.flops import count_flops


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # proj=False, 4 heads of 4, 8x8 grid, 7x7 window (49 offsets) and kernel:
        # scores and aggregation 2*64*49*4*(4+4) = 200,704 plus the conv term 2*64*16*49 = 100,352
        ({"proj": False}, 301_056),
        # plus 'qk' projections 2*2*64*16*16 = 65,536 and value/output projections 2*2*64*16*16 = 65,536
        ({"score": "qk"}, 432_128),
        # global attention: 64 keys per query, 2*64*64*4*8 = 262,144, conv 3x3: 2*64*16*9 = 18,432
        ({"proj": False, "kernel_size": 3, "window": None}, 280_576),
        # an 11x11 window on the 8x8 grid: centred, it reaches 5 steps either way (121 offsets, with the
        # 3x3 conv 2*64*121*4*8 + 18,432); causal or 'shift', 8 of its 11 points fit per dim (64 keys)
        ({"proj": False, "kernel_size": 3, "window": 11}, 514_048),
        ({"proj": False, "kernel_size": 3, "window": 11, "causal": True}, 280_576),
        ({"proj": False, "kernel_size": 3, "window": 11, "border": "shift"}, 280_576),
        # a causal 5x5 window: 25 keys, as centred
        ({"proj": False, "kernel_size": 3, "window": 5, "causal": True}, 120_832),
    ],
)
def test_conv_plus_flops_are_the_same_on_every_backend_and_device(kwargs, expected):
    module = ConvPlus2d(16, **kwargs)
    x = torch.randn(1, 16, 8, 8)
    windowed = module.window is not None
    counts = {}
    for backend in ("auto", "reference", "global", *(("local", "cpu") if windowed else ())):
        module.backend = backend
        counts[backend] = count_flops(module, x)
    with torch.device("meta"):
        counts["meta"] = count_flops(ConvPlus2d(16, **kwargs), torch.empty(1, 16, 8, 8))
    assert counts == dict.fromkeys(counts, expected)


def test_layers_around_conv_plus_are_counted_by_the_profiler():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), ConvPlus2d(16, proj=False))
    assert count_flops(model, torch.randn(1, 3, 8, 8)) == 2 * 64 * 3 * 16 + 301_056
