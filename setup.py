"""Compiles the fused C++ CPU kernel into the package (``convplus.backends._cpu_kernels``) at install time.

Everything else about the package is in pyproject.toml. The sources and flags are those of the just-in-time
fallback, read from ``src/convplus/backends/cpu_build.py``. Building needs torch (a build requirement);
``-march=native`` makes the compiled kernel specific to the machine that builds it.
"""

import runpy
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
build = runpy.run_path(str(ROOT / "src/convplus/backends/cpu_build.py"))


def relative(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


setup(
    ext_modules=[
        CppExtension(
            build["MODULE"],
            sources=relative(build["sources"]()),
            depends=relative(build["headers"]()),
            extra_compile_args=[*build["EXTRA_CFLAGS"], "-g0"],  # setuptools passes Python's -g; no debug info
            extra_link_args=list(build["EXTRA_LDFLAGS"]),
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
