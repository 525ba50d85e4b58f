"""Build helper for the CUDA decode extension `proper_kernels._C` (never installed).

setup.py calls `cuda_extensions(repo_root) -> (ext_modules, cmdclass)`. The extension
is built only when all of these hold, otherwise a one-line message says why it is
skipped and the package installs without it (the Triton / PyTorch paths still run):

- `PROPER_KERNELS_SKIP_CUDA_BUILD` is not "1";
- nvcc is found (`$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `nvcc` on PATH,
  `/usr/local/cuda/bin/nvcc`);
- pybind11 is importable at build time (with pip's build isolation it usually is
  not: use `pip install --no-build-isolation -e .` to get the extension).

Architectures: `PROPER_KERNELS_CUDA_ARCH_LIST`, torch-style, e.g. "8.0;9.0+PTX"
(also "80 90", "sm_80,sm_90a"); default "8.0;9.0+PTX" = SASS for sm_80 (runs on all
8.x GPUs) and sm_90, plus compute_90 PTX for JIT on newer GPUs. A compile error makes
the build skip the extension with a message unless `PROPER_KERNELS_REQUIRE_CUDA_BUILD=1`,
which also turns every other reason to skip it (no nvcc, no pybind11, a malformed
arch list) into an error; `PROPER_KERNELS_SKIP_CUDA_BUILD=1` still wins.

The extension links only the CUDA runtime, statically (cudart_static), so it needs
no libcudart on the library path and never links torch; it needs a driver at least
as new as the toolkit it was built with.

`python python/build_cuda.py --ptxas 90` prints registers and spills of every kernel
instance for sm_90 from `nvcc -Xptxas -v` (no GPU needed).

Standalone: `python python/build_cuda.py --check` builds the extension into a temp
directory through the same setuptools path, imports it and prints its architectures
(exit 0 on success, 1 on a build failure, 2 when nvcc or pybind11 is missing).

CPU emulation: `python python/build_cuda.py --emulate` compiles the same csrc/ sources
with the host C++ compiler against csrc/emu/cuda_emu.h (no nvcc, no GPU) into the
module `_C_emu`, cached under build/emu/ by a hash of the sources and flags, and
prints its path. `proper_kernels.ops.cuda_decode.run_extension(mod, ...)` runs the
decode kernel through it on CPU tensors: that is how CI executes the CUDA kernel.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

EXT_NAME = "proper_kernels._C"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Every file of csrc/ is in one of these lists (tests/test_cuda_build.py checks it): the
# headers decide when the extension is relinked and when the emulation is rebuilt.
CU_SOURCES = ["csrc/lora_mixture_decode.cu"]  # host launch code; includes the kernels header
CPP_SOURCES = ["csrc/bindings.cpp"]
HEADERS = ["csrc/lora_mixture_decode.h", "csrc/lora_mixture_decode_kernels.cuh"]
EMU_SOURCES = ["csrc/emu/cuda_emu.cpp", "csrc/emu/selftest.cpp"]
EMU_HEADERS = HEADERS + ["csrc/emu/cuda_emu.h"]
EMU_NAME = "_C_emu"


def _say(msg: str) -> None:
    print(f"[proper-kernels] {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> tuple[str | None, str | None]:
    """(cuda_home, nvcc) or (None, None). cuda_home is the toolkit root holding the
    static runtime; nvcc may be a wrapper script outside it."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) and _cudart_static_dir(home):
            return home, nvcc
    if on_path:  # a wrapper on PATH whose toolkit we could not locate
        return None, on_path
    return None, None


def _cudart_static_dir(home: str) -> str | None:
    pats = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    pats += sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))
    for d in pats:
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    return None


def parse_arch_list(spec: str) -> list[tuple[str, bool]]:
    """"8.0;9.0+PTX" -> [("80", False), ("90", True)]. Suffixes like 9.0a are kept."""
    out = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        if ptx:
            item = item[:-4]
        item = item.lower().replace("sm_", "").replace("compute_", "")
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)|(\d{2,3})([af]?)", item)
        if not m:
            raise ValueError(f"PROPER_KERNELS_CUDA_ARCH_LIST: cannot parse {item!r}")
        arch = (m.group(1) + m.group(2) + m.group(3)) if m.group(1) else (m.group(4) + m.group(5))
        if int(re.sub(r"\D", "", arch)) < 75:
            raise ValueError(f"PROPER_KERNELS_CUDA_ARCH_LIST: sm_{arch} is older than sm_75 "
                             "(unsupported by CUDA 13 and by this kernel)")
        out.append((arch, ptx))
    if not out:
        raise ValueError("PROPER_KERNELS_CUDA_ARCH_LIST is empty")
    return out


def nvcc_arch_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for arch, ptx in archs:
        code = f"sm_{arch}" if not ptx else f"[sm_{arch},compute_{arch}]"
        flags.append(f"-gencode=arch=compute_{arch},code={code}")
    ptx_archs = [a for a, p in archs if p]
    if ptx_archs:
        flags.append(f'-DPROPER_KERNELS_PTX_ARCHS="{",".join(ptx_archs)}"')
    return flags


def source_path(repo_root: str, p: str) -> str:
    """A source path for setuptools: relative when run from the repo root (as pip
    does), else absolute."""
    if os.path.abspath(os.getcwd()) == os.path.abspath(repo_root):
        return p
    return os.path.join(os.path.abspath(repo_root), p)


# The variable that turns a failed build of each extension into a failed install.
REQUIRE_VARIABLE = {EXT_NAME: "PROPER_KERNELS_REQUIRE_CUDA_BUILD", "proper_kernels._cpu": "PROPER_KERNELS_REQUIRE_CPU_BUILD"}


def build_each(cmd) -> None:
    """Build each extension of a build_ext command, dropping (with a message) one that
    fails, unless its REQUIRE_VARIABLE is "1"."""
    keep = []
    for ext in list(cmd.extensions):
        try:
            cmd.build_extension(ext)
            keep.append(ext)
        except Exception as exc:  # noqa: BLE001 - report and go on without it
            if os.environ.get(REQUIRE_VARIABLE.get(ext.name, "")) == "1":
                raise
            _say(f"building {ext.name} failed, installing without it: {exc}")
    cmd.extensions[:] = keep


def _make_build_ext(nvcc: str, cuda_home: str, archs: list[tuple[str, bool]], ptxas_log: list | None = None):
    """The build_ext command class; with ``ptxas_log`` (a list) nvcc also runs ptxas
    verbosely, one arch after the other, and its report is appended to the list."""
    from setuptools.command.build_ext import build_ext

    class NvccBuildExt(build_ext):
        """Compiles the .cu sources with nvcc, then lets setuptools compile the
        .cpp sources and link. A failure drops the extension (with a message)
        unless PROPER_KERNELS_REQUIRE_CUDA_BUILD=1."""

        def build_extensions(self):
            build_each(self)

        def build_extension(self, ext):
            cu = [s for s in ext.sources if s.endswith(".cu")]
            if cu:
                objs = []
                os.makedirs(self.build_temp, exist_ok=True)
                for src in cu:
                    obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                    # One thread per arch, except for a ptxas report: parallel ptxas runs
                    # would interleave their lines.
                    threads = ["-Xptxas", "-v"] if ptxas_log is not None else ["--threads", "0"]
                    cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                           "-Xcompiler", "-fPIC", *threads, "-lineinfo",
                           "-I" + os.path.dirname(os.path.abspath(src))]
                    cmd += nvcc_arch_flags(archs)
                    _say("nvcc: " + " ".join(cmd))
                    res = subprocess.run(cmd, check=True, capture_output=ptxas_log is not None, text=True)
                    if ptxas_log is not None:
                        ptxas_log.append(res.stderr)
                    objs.append(obj)
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.extra_objects = list(ext.extra_objects or []) + objs
            super().build_extension(ext)

    return NvccBuildExt


def cuda_extensions(repo_root: str, verbose: bool = True, ptxas_log: list | None = None):
    """(ext_modules, cmdclass) for setup(); ([], {}) with a message when skipped."""
    if os.environ.get("PROPER_KERNELS_SKIP_CUDA_BUILD") == "1":
        if verbose:
            _say(f"skipping the CUDA extension {EXT_NAME}: PROPER_KERNELS_SKIP_CUDA_BUILD=1")
        return [], {}

    def skip(why: str):
        if os.environ.get("PROPER_KERNELS_REQUIRE_CUDA_BUILD") == "1":
            raise RuntimeError(f"PROPER_KERNELS_REQUIRE_CUDA_BUILD=1 but {EXT_NAME} cannot be built: {why}")
        if verbose:
            _say(f"skipping the CUDA extension {EXT_NAME}: {why}")
        return [], {}
    cuda_home, nvcc = find_cuda_home()
    if nvcc is None:
        return skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if cuda_home is None:
        return skip(f"found {nvcc} but no CUDA toolkit with libcudart_static.a (set CUDA_HOME)")
    try:
        import pybind11
    except ImportError:
        return skip("pybind11 is not importable at build time "
                    "(pip build isolation? use `pip install --no-build-isolation -e .`)")
    try:
        # Set but empty is unset (as torch's TORCH_CUDA_ARCH_LIST): the default list.
        archs = parse_arch_list(os.environ.get("PROPER_KERNELS_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST)
    except ValueError as exc:
        return skip(str(exc))
    try:
        from setuptools import Extension
    except ImportError:
        return skip("setuptools is missing")

    rel = functools.partial(source_path, repo_root)

    ext = Extension(
        EXT_NAME,
        sources=[rel(p) for p in CPP_SOURCES + CU_SOURCES],
        depends=[rel(p) for p in CU_SOURCES + HEADERS],  # setuptools relinks when these are newer
        include_dirs=[pybind11.get_include(), os.path.join(repo_root, "csrc")],
        library_dirs=[_cudart_static_dir(cuda_home)],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-fvisibility=hidden"],
        language="c++",
    )
    if verbose:
        _say(f"building {EXT_NAME} with {nvcc} for "
             + ", ".join(f"sm_{a}" + ("+PTX" if p else "") for a, p in archs))
    return [ext], {"build_ext": _make_build_ext(nvcc, cuda_home, archs, ptxas_log)}


def check(repo_root: str, ptxas_arch: str | None = None) -> int:
    """Build into a temp dir through setuptools, import, print the result; with
    ``ptxas_arch`` also print the ptxas report of that arch (one of the build's) from
    the same compile, as :func:`print_ptxas` does."""
    t0 = time.time()
    cwd = os.getcwd()
    os.chdir(repo_root)
    ptxas_log: list | None = [] if ptxas_arch else None
    try:
        exts, cmdclass = cuda_extensions(repo_root, ptxas_log=ptxas_log)
    except RuntimeError as exc:  # PROPER_KERNELS_REQUIRE_CUDA_BUILD=1 and a reason to skip
        _say(str(exc))
        exts = []
    finally:
        os.chdir(cwd)
    if not exts:
        print("CHECK SKIPPED: the extension would not be built here (see message above)")
        return 2
    from setuptools import Distribution

    tmp = tempfile.mkdtemp(prefix="proper_kernels_cuda_check_")
    os.environ["PROPER_KERNELS_REQUIRE_CUDA_BUILD"] = "1"
    try:
        os.chdir(repo_root)
        dist = Distribution({"name": "proper-kernels-check", "ext_modules": exts,
                             "cmdclass": cmdclass, "script_name": "build_cuda.py"})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = os.path.join(tmp, "lib")
        cmd.build_temp = os.path.join(tmp, "temp")
        cmd.inplace = False
        cmd.ensure_finalized()
        cmd.run()
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        so = os.path.join(tmp, "lib", "proper_kernels", "_C" + suffix)
        if not os.path.isfile(so):
            print(f"CHECK FAILED: {so} was not produced")
            return 1
        import importlib.util

        spec = importlib.util.spec_from_file_location("_C", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"CHECK OK: built {os.path.basename(so)} ({os.path.getsize(so) // 1024} KiB) "
              f"in {time.time() - t0:.1f} s; archs {mod.built_archs()}; "
              f"CUDA runtime {mod.cuda_runtime_version()}")
        if ptxas_arch:
            print_ptxas(parse_ptxas("".join(ptxas_log), ptxas_arch))
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"CHECK FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


_KERNEL_RE = re.compile(r"_lora_mixture_(shrink|expand|fused)_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)E")
_DTYPE_OF = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def ptxas_report(repo_root: str, arch: str = "90") -> list[dict]:
    """Registers and spills of every kernel instance in csrc/, from `nvcc -Xptxas -v`
    for sm_<arch> (no GPU needed). Rows: kernel (shrink / expand / fused), dtype, vec
    (elements per vector load), registers, spill_stores (bytes). Raises RuntimeError
    when nvcc is missing or the compile fails."""
    _, nvcc = find_cuda_home()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    root = os.path.abspath(repo_root)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", os.path.join(root, CU_SOURCES[0]), "-o", os.path.join(tmp, "k.o"), "-O3", "-std=c++17",
               "-I" + os.path.join(root, "csrc"), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
    return parse_ptxas(res.stderr, arch)


def parse_ptxas(text: str, arch: str) -> list[dict]:
    """The rows of :func:`ptxas_report` from nvcc's ``-Xptxas -v`` output, for sm_<arch> only."""
    rows, cur = [], None
    for line in text.splitlines():
        if "Compiling entry function" in line:
            m = _KERNEL_RE.search(line)
            on_arch = f"'sm_{arch}'" in line
            cur = dict(kernel=m.group(1), dtype=_DTYPE_OF[m.group(2)], vec=int(m.group(3))) if m and on_arch else None
        elif cur is not None and "spill stores" in line:
            cur["spill_stores"] = int(re.search(r"(\d+) bytes spill stores", line).group(1))
        elif cur is not None and "Used" in line and "registers" in line:
            cur["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            rows.append(cur)
            cur = None
    return rows


def print_ptxas(rows: list[dict]) -> None:
    """The ptxas report as a table (``--ptxas``, ``--check --ptxas``)."""
    print(f"{'kernel':8} {'dtype':5} {'vec':>3} {'registers':>9} {'spill B':>7}")
    for row in rows:
        print(f"{row['kernel']:8} {row['dtype']:5} {row['vec']:>3} {row['registers']:>9} {row.get('spill_stores', 0):>7}")


def _host_cxx() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def build_emulator(repo_root: str, out_dir: str | None = None, verbose: bool = False,
                   defines: tuple = ()) -> str:
    """Compile the CPU emulation module `_C_emu` and return the path of the .so.

    Cached: the file name carries a hash of the sources, the compiler and the flags,
    so an unchanged tree reuses the previous build (about 10 s otherwise). Raises
    RuntimeError naming what is missing (a C++17 compiler, pybind11) or the compiler's
    output on an error. ``defines``: extra preprocessor definitions, e.g.
    ("PK_EMU_USE_UCONTEXT",) for the portable fiber switch used off x86-64.
    """
    cxx = _host_cxx()
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++, c++ or clang++; or set CXX)")
    try:
        import pybind11
    except ImportError as exc:
        raise RuntimeError("pybind11 is not importable (pip install pybind11)") from exc
    import hashlib

    root = os.path.abspath(repo_root)
    sources = [os.path.join(root, p) for p in CPP_SOURCES + CU_SOURCES + EMU_SOURCES]
    flags = ["-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall",
             "-DPROPER_KERNELS_EMULATE", f"-DPROPER_KERNELS_MODULE_NAME={EMU_NAME}",
             "-I" + os.path.join(root, "csrc"), "-I" + pybind11.get_include(),
             "-I" + sysconfig.get_paths()["include"]] + ["-D" + d for d in defines]
    h = hashlib.sha256()
    for path in sources + [os.path.join(root, p) for p in EMU_HEADERS]:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join([cxx] + flags).encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out_dir = out_dir or os.path.join(root, "build", "emu", h.hexdigest()[:16])
    so = os.path.join(out_dir, EMU_NAME + suffix)
    if os.path.isfile(so):
        return so
    os.makedirs(out_dir, exist_ok=True)
    tmp = so + f".tmp{os.getpid()}"
    # Each source as C++ (the .cu too: the emulation header replaces the CUDA parts).
    cmd = [cxx] + flags + [a for src in sources for a in ("-x", "c++", src)] + ["-o", tmp]
    if verbose:
        _say("emulator: " + " ".join(cmd))
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling the CPU emulation failed ({cxx}):\n{res.stderr[-6000:]}")
    os.replace(tmp, so)
    if verbose:
        _say(f"built {so} in {time.time() - t0:.1f} s")
    return so


def load_emulator(repo_root: str, defines: tuple = ()):
    """Build (if needed) and import the CPU emulation module; returns the module."""
    import importlib.util

    so = build_emulator(repo_root, defines=defines)
    spec = importlib.util.spec_from_file_location(EMU_NAME, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compile the extension into a temp dir and import it")
    ap.add_argument("--ptxas", metavar="ARCH", help="print registers and spills of every kernel for sm_ARCH "
                    "(e.g. 90), from nvcc -Xptxas -v; with --check, from the check's own compile")
    ap.add_argument("--emulate", action="store_true",
                    help="compile the CPU emulation module _C_emu (host compiler) and print its path")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.check:
        sys.exit(check(root, args.ptxas))
    if args.ptxas:
        try:
            report = ptxas_report(root, args.ptxas)
        except RuntimeError as exc:
            print(f"PTXAS REPORT FAILED: {exc}")
            sys.exit(1)
        print_ptxas(report)
        sys.exit(0)
    if args.emulate:
        try:
            print(build_emulator(root, verbose=True))
        except RuntimeError as exc:
            print(f"EMULATOR BUILD FAILED: {exc}")
            sys.exit(1)
        sys.exit(0)
    ap.print_help()
