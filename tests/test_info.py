"""``convplus info`` reports versions, devices and, for every backend, whether it runs here and why not."""

from __future__ import annotations

import torch

from convplus import backends
from convplus.cli import main
from convplus.neighborhood import Neighborhood


def test_info_lists_versions_devices_and_every_backend(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    for package in ("python", "convplus", "torch", "torchvision", "timm", "triton"):
        assert any(line.startswith(f"{package}: ") for line in lines), package
    assert f"torch: {torch.__version__.split('+')[0]}" in text
    assert "CPU: " in text and ("CUDA device 0: " in text if torch.cuda.is_available() else "CUDA: no device" in text)
    cpu_section = lines[lines.index("backends on cpu:") + 1 :]
    for name, backend in backends.BACKENDS.items():
        reason = backend.unavailable_reason(torch.device("cpu"))
        expected = "runs" if reason is None else f"cannot run: {reason}"
        assert any(line.split()[:1] == [name] and expected in line for line in cpu_section), name
    assert f"'auto' picks {backends.select((64, 64), torch.device('cpu'), Neighborhood.of((7, 7), (1, 1)))!r}" in text
