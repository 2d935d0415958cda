"""Builds normkit's CPU kernels (``normkit.kernels._cpu``) when the package is installed.

The kernels are C++ (src/normkit/kernels/csrc), compiled with torch's C++ extension tooling
(``torch.utils.cpp_extension``): the host side uses torch's headers (tensors, the autograd node,
``at::parallel_for``), so the build needs the torch it will run with.  Install torch first and
build without pip's isolated build environment, which would otherwise install a torch of its
own (possibly a multi-GB CUDA build, or another version than the one that imports it)::

    pip install "torch==2.13.0" "setuptools>=77" ninja
    pip install --no-build-isolation -e .

Why setuptools with torch's ``cpp_extension`` rather than scikit-build-core with CMake and
nanobind: the extension must link against the very libtorch the user runs, with torch's own
compiler flags (C++ ABI, include and library paths, OpenMP), which ``cpp_extension`` knows and
a CMake build would have to rediscover through torch's CMake package; pybind11 comes with
torch's headers, so nothing else is needed; and ninja (if installed) compiles the sources in
parallel.  Nothing is built at run time: importing normkit never compiles anything.

Every kernel source is compiled with ``-ffp-contract=off`` (no product is fused into an
addition but where the source says so: the bits are part of the contract) and no fast-math
flag.  The instruction-set paths (isa_*.cpp) set their own targets in the source, so one set of
flags serves every file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "normkit's CPU kernels are built against the installed torch, and none was found here.\n"
        "Install torch first, then build without an isolated build environment:\n"
        '    pip install "torch==2.13.0" "setuptools>=77" ninja\n'
        "    pip install --no-build-isolation -e .\n"
        "(pip's isolated build would otherwise install a torch of its own.)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("src", "normkit", "kernels", "csrc")
SOURCES = ["host.cpp", "launch.cpp", "buffers.cpp", "dispatch.cpp", "isa_generic.cpp",
           "isa_avx2.cpp", "isa_avx512.cpp", "isa_avx512bf16.cpp",
           "group.cpp"]


def _openmp_flags() -> list[str]:
    """["-fopenmp"] where the C++ compiler takes it: at::parallel_for runs a launch on torch's
    OpenMP threads only in code compiled with OpenMP (without it, every launch runs on the
    calling thread, and the tests say so)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        r = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                           capture_output=True)
    return ["-fopenmp"] if r.returncode == 0 else []


omp = _openmp_flags()
# What the bits depend on: no contraction, no fast-math (the module records these, and a test
# reads them back).  -fno-math-errno only lets sqrt be one instruction (it sets no bits).
numerics = ["-ffp-contract=off", "-fno-math-errno"]
flags = ["-O2", "-g0", *numerics, "-fvisibility=hidden", "-Wno-psabi",
         f'-DNK_TORCH_VERSION="{torch.__version__}"',
         f'-DNK_BUILD_FLAGS="{" ".join(["-O2", *numerics, *omp])}"', *omp]


class Build(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, compiling into build/ of the checkout whatever pip asked for: pip's
    editable install otherwise compiles in a temporary directory, and a wheel built afterwards
    (.ci/check-wheel) would compile everything again.  ninja rebuilds what changed (sources or
    flags, torch's headers and version included)."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}".replace("+", "_")
        self.build_temp = os.path.join(HERE, "build", f"temp-{tag}")


setup(
    ext_modules=[
        CppExtension(
            "normkit.kernels._cpu",
            [os.path.join(CSRC, s) for s in SOURCES],
            extra_compile_args={"cxx": flags},
            extra_link_args=omp,
        )
    ],
    cmdclass={"build_ext": Build},
)
