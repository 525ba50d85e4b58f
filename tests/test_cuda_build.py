"""The build of the CUDA decode extension (python/build_cuda.py; no GPU needed).

* the nvcc build: `python python/build_cuda.py --check` compiles and imports the
  extension through setuptools (skipped without nvcc / pybind11), and the register
  budget of every kernel instance from `nvcc -Xptxas -v`;
* the build settings: the arch list (PROPER_KERNELS_CUDA_ARCH_LIST), skipping
  (PROPER_KERNELS_SKIP_CUDA_BUILD, no pybind11) and requiring the build
  (PROPER_KERNELS_REQUIRE_CUDA_BUILD);
* the source lists: every file of csrc/ is compiled or tracked as a header.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from proper_kernels.testing import load_build_cuda, repo_root

ROOT = repo_root()


# ---- the nvcc build --------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_build():
    """One nvcc build of the extension (sm_80, sm_90 + PTX) through `build_cuda.py --check
    --ptxas 90`: its output holds the check's result and the sm_90 ptxas report."""
    bc = load_build_cuda()
    if bc.find_cuda_home()[1] is None:
        pytest.skip("nvcc not found")
    pytest.importorskip("pybind11")
    env = dict(os.environ)
    env.pop("PROPER_KERNELS_SKIP_CUDA_BUILD", None)
    env.pop("PROPER_KERNELS_CUDA_ARCH_LIST", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", "build_cuda.py"), "--check", "--ptxas", "90"],
                          capture_output=True, text=True, timeout=900, env=env)
    return proc


def test_build_check_compiles(check_build):
    out = check_build.stdout
    assert check_build.returncode == 0 and "CHECK OK" in out, out + check_build.stderr
    assert "sm_80" in out and "sm_90" in out


def test_ptxas_registers_and_spills(check_build):
    """Register budget of the CUDA kernels on sm_90 (nvcc -Xptxas -v, no GPU): every
    instance (3 kernels x 3 dtypes x 3 vector widths) fits the 128 registers of two
    blocks per SM (__launch_bounds__(256, 2) for shrink and the single launch) and
    spills at most 16 bytes."""
    assert check_build.returncode == 0, check_build.stdout + check_build.stderr
    table = check_build.stdout.split("CHECK OK", 1)[1].splitlines()
    head = next(i for i, line in enumerate(table) if line.split()[:2] == ["kernel", "dtype"])
    rows = [dict(zip(("kernel", "dtype", "vec", "registers", "spill_stores"), line.split()))
            for line in table[head + 1:] if line.strip()]
    assert sorted({(r["kernel"], r["dtype"]) for r in rows}) == sorted(
        (k, d) for k in ("shrink", "expand", "fused") for d in ("bf16", "fp16", "fp32"))
    assert len(rows) == 27
    for r in rows:
        assert int(r["registers"]) <= 128, r
        assert int(r["spill_stores"]) <= 16, r


def test_ptxas_report_alone_parses_one_arch():
    """`--ptxas ARCH` alone (no build) and the check's report parse the same nvcc lines:
    rows of another arch in the same output are left out."""
    bc = load_build_cuda()
    text = "\n".join([
        "ptxas info    : Compiling entry function '_Z26_lora_mixture_shrink_kernelIfLi4EEv' for 'sm_80'",
        "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 64 registers, used 0 barriers, 368 bytes cmem[0]",
        "ptxas info    : Compiling entry function '_Z26_lora_mixture_shrink_kernelIfLi4EEv' for 'sm_90'",
        "ptxas info    : 8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
        "ptxas info    : Used 72 registers",
    ])
    assert bc.parse_ptxas(text, "90") == [dict(kernel="shrink", dtype="fp32", vec=4, spill_stores=4, registers=72)]
    assert [r["registers"] for r in bc.parse_ptxas(text, "80")] == [64]


def test_every_csrc_file_is_listed():
    """Each file of csrc/ is a source of the CUDA extension, the emulation or the CPU
    kernels (python/build_cpu.py), or a header whose change rebuilds them (the
    emulation's cache key, setuptools' depends)."""
    bc = load_build_cuda()
    on_disk = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
               if os.path.isfile(p)}
    spec = importlib.util.spec_from_file_location("build_cpu", os.path.join(ROOT, "python", "build_cpu.py"))
    build_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_cpu)
    listed = bc.CU_SOURCES + bc.CPP_SOURCES + bc.EMU_SOURCES + bc.EMU_HEADERS + build_cpu.CPU_SOURCES
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == on_disk
    assert set(bc.HEADERS) <= set(bc.EMU_HEADERS)


# ---- build settings ----------------------------------------------------------------------


def test_build_skips_cleanly(monkeypatch, capsys):
    bc = load_build_cuda()
    monkeypatch.setenv("PROPER_KERNELS_SKIP_CUDA_BUILD", "1")
    assert bc.cuda_extensions(ROOT) == ([], {})
    assert "PROPER_KERNELS_SKIP_CUDA_BUILD" in capsys.readouterr().err
    monkeypatch.delenv("PROPER_KERNELS_SKIP_CUDA_BUILD")
    monkeypatch.setitem(sys.modules, "pybind11", None)  # import pybind11 -> ImportError
    exts, cmdclass = bc.cuda_extensions(ROOT)
    err = capsys.readouterr().err
    assert exts == [] and cmdclass == {}
    assert "pybind11" in err or "nvcc" in err


def test_arch_list_parsing():
    bc = load_build_cuda()
    assert bc.parse_arch_list("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert bc.parse_arch_list("sm_80, 90a") == [("80", False), ("90a", False)]
    flags = bc.nvcc_arch_flags(bc.parse_arch_list(bc.DEFAULT_ARCH_LIST))
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=[sm_90,compute_90]" in flags
    with pytest.raises(ValueError):
        bc.parse_arch_list("7.0")
    with pytest.raises(ValueError):
        bc.parse_arch_list("banana")


def _build_cuda_that_would_build(monkeypatch):
    """python/build_cuda.py, where a build would be attempted (a CUDA toolkit, pybind11,
    no PROPER_KERNELS_SKIP_CUDA_BUILD); skips otherwise (the arch list is never read)."""
    bc = load_build_cuda()
    if bc.find_cuda_home()[0] is None:
        pytest.skip("no CUDA toolkit: the build is skipped before the arch list is read")
    pytest.importorskip("pybind11")
    monkeypatch.delenv("PROPER_KERNELS_SKIP_CUDA_BUILD", raising=False)
    return bc


def test_require_build_fails_on_bad_arch_list(monkeypatch):
    """A malformed arch list skips the build with a message, unless
    PROPER_KERNELS_REQUIRE_CUDA_BUILD=1, which makes a missing extension fail the
    install; PROPER_KERNELS_SKIP_CUDA_BUILD=1 wins over both."""
    bc = _build_cuda_that_would_build(monkeypatch)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_ARCH_LIST", "banana")
    assert bc.cuda_extensions(ROOT, verbose=False) == ([], {})
    monkeypatch.setenv("PROPER_KERNELS_REQUIRE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="banana"):
        bc.cuda_extensions(ROOT, verbose=False)
    monkeypatch.setenv("PROPER_KERNELS_SKIP_CUDA_BUILD", "1")  # an explicit skip still wins
    assert bc.cuda_extensions(ROOT, verbose=False) == ([], {})


def test_empty_arch_list_env_means_default(monkeypatch):
    """PROPER_KERNELS_CUDA_ARCH_LIST= (set but empty) is the default list, as torch's
    TORCH_CUDA_ARCH_LIST, not a reason to skip the build."""
    bc = _build_cuda_that_would_build(monkeypatch)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_ARCH_LIST", " ")
    exts, cmdclass = bc.cuda_extensions(ROOT, verbose=False)
    assert len(exts) == 1 and "build_ext" in cmdclass
    # a changed kernel or header relinks the extension
    assert {os.path.basename(d) for d in exts[0].depends} >= {"lora_mixture_decode.cu", "lora_mixture_decode_kernels.cuh"}
