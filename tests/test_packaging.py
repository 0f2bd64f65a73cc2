"""The installed package: silent to import, and its wheel carries the C++ CPU kernel compiled at build time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_first_use_of_the_cpu_backend_write_nothing_to_stderr():
    script = "import torch, convplus; convplus.ConvPlus2d(8, heads=2, kernel_size=3)(torch.randn(1, 8, 9, 9))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr == ""


CHECK_INSTALLED = r"""
import os, sys, torch, convplus
from convplus import conv_plus
from convplus.backends import cpu

assert convplus.__file__.startswith(sys.prefix), convplus.__file__  # the installed copy, not the sources
assert cpu.extension().__name__ == "convplus.backends._cpu_kernels", cpu.extension()
torch.manual_seed(0)
x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
args = dict(heads=2, kernel=torch.randn(2, 4, 3, 3, dtype=torch.float64), gain=torch.tensor([0.5, 1.5]).double(),
            window=(5, 5), dilation=(1, 1), temperature=torch.tensor([3.0, 0.5]).double())
y = conv_plus(x, **args, backend="cpu")
torch.testing.assert_close(y, conv_plus(x, **args, backend="reference"), rtol=1e-10, atol=1e-12)
assert os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]) == []  # nothing was built just in time
"""


@pytest.mark.packaging
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")
def test_the_wheel_carries_the_compiled_kernel_and_the_installed_package_uses_it(tmp_path):
    source = tmp_path / "source"  # a clean copy: the build writes build/ and *.egg-info next to its sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = dist.glob("convplus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    csrc = sorted(p.name for p in (ROOT / "src/convplus/backends/csrc").iterdir())
    assert [n for n in names if n.startswith("convplus/backends/_cpu_kernels") and n.endswith(".so")]
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("convplus/backends/csrc/")) == csrc

    # a fresh virtualenv that reuses this environment's packages (torch) through a .pth file
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    )
    Path(site.stdout.strip(), "reused.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run([python, "-c", CHECK_INSTALLED], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
