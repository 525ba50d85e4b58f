"""Build helper for the CPU kernels `proper_kernels._cpu` (never installed).

setup.py calls `cpu_extension(repo_root)`: a setuptools Extension compiling
csrc/cpu/ with the host C++ compiler against the installed torch (its headers and
libc10 / libtorch_cpu, found at run time through an rpath), or None with a one-line
message when it is skipped. Skipped when `PROPER_KERNELS_SKIP_CPU_BUILD=1` or when
torch is not importable at build time (pip's build isolation: use
`pip install --no-build-isolation -e .`). A compile error drops the extension with a
message (see `tolerant_build_ext`) unless `PROPER_KERNELS_REQUIRE_CPU_BUILD=1`; the
package then runs the same math in plain PyTorch ops.

The kernels are the per-token work of the torch backend's wide variant
(proper_kernels/ops/torch_backend.py), registered as torch.ops.proper_kernels_cpu.*.
"""
from __future__ import annotations

import os
import sys

EXT_NAME = "proper_kernels._cpu"
# Every file of csrc/cpu/ (tests/test_cuda_build.py checks that csrc/ has no other).
CPU_SOURCES = ["csrc/cpu/wide_layer.cpp"]


def _say(msg: str) -> None:
    print(f"[proper-kernels] {msg}", file=sys.stderr, flush=True)


def cpu_extension(repo_root: str, verbose: bool = True):
    """The Extension of the CPU kernels, or None (with a message) when skipped."""
    if os.environ.get("PROPER_KERNELS_SKIP_CPU_BUILD") == "1":
        if verbose:
            _say(f"skipping the CPU kernels {EXT_NAME}: PROPER_KERNELS_SKIP_CPU_BUILD=1")
        return None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if os.environ.get("PROPER_KERNELS_REQUIRE_CPU_BUILD") == "1":
            raise
        if verbose:
            _say(f"skipping the CPU kernels {EXT_NAME}: torch is not importable at build time "
                 "(pip install --no-build-isolation -e . builds them)")
        return None
    from setuptools import Extension

    from build_cuda import source_path

    lib_dirs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return Extension(
        EXT_NAME,
        sources=[source_path(repo_root, s) for s in CPU_SOURCES],
        include_dirs=cpp_extension.include_paths(),
        library_dirs=lib_dirs,
        runtime_library_dirs=lib_dirs,
        libraries=["c10", "torch_cpu"],
        extra_compile_args=["-O3", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-fopenmp",
                            "-Wno-c++20-extensions"],
        extra_link_args=["-fopenmp"],
        language="c++",
    )


def tolerant_build_ext():
    """setuptools' build_ext, dropping an extension whose build fails (with a message)
    unless PROPER_KERNELS_REQUIRE_CPU_BUILD=1 (build_cuda.build_each, which the CUDA
    build's command shares)."""
    from setuptools.command.build_ext import build_ext

    from build_cuda import build_each

    class TolerantBuildExt(build_ext):
        def build_extensions(self):
            build_each(self)

    return TolerantBuildExt
