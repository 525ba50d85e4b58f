#!/usr/bin/env python
"""Ahead-of-time register / spill check of every Triton kernel of proper_kernels.triton.

Needs no GPU: the launchers (``mixture_fwd``, ``mixture_bwd``) run on ``meta``
tensors with their kernels swapped for recorders, so the kernels, the configs and
the specializations checked are exactly the ones the launchers would use (the
config tables are never duplicated here). The launchers pick their configs for the
checked arch through ``proper_kernels.runtime.target.target_arch`` (on meta tensors
they would otherwise pick the default, sm_90's). Each distinct launch is then compiled
with triton's AOT API (``triton.compile(ASTSource(...), target=GPUTarget(...))``)
for the chosen target, and ptxas' resource report (``-v``) gives registers, spill
stores / loads and stack; triton's metadata gives the shared memory, which is
checked against the arch's per-block limit (a launch over it fails at run time).

Usage::

    python python/aot_check.py                   # sm_90, the target shapes, a table
    python python/aot_check.py --fail-on-spill   # exit 1 if any kernel spills
    python python/aot_check.py --arch 80 --dtypes bf16,fp32 -v
    python python/aot_check.py --quick           # a reduced set (tests/test_aot.py)

Target shapes: d_in = d_out = 4096 and the llama 4096 <-> 11008 projections, K=8,
r=16, r_u=16, 64 users, bf16; decode T in {1, 16, 64, 256}, prefill T in {1024, 8192}.
Forward variants: "fused" (what the launcher picks for bf16), "standalone" (forced)
and "mixture" (no W0). The backward kernels do not depend on T or d beyond
divisibility, except that the per-user reductions split over tokens when T exceeds
their ``SPLIT_T``: the backward runs at the largest decode T (one pass) and the
largest prefill T (chunk + reduce passes).

Results are cached (triton's own cache for the binaries, a small JSON per kernel
hash for the ptxas report), so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Tuple

# The kernels must be real JITFunctions, not interpreted ones.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    os.environ["TRITON_INTERPRET"] = "0"
    if "triton" in sys.modules:
        raise RuntimeError("aot_check: triton was imported with TRITON_INTERPRET=1; run in a fresh process")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import warnings  # noqa: E402

# Quiet by default: triton 3.9 warns once per process that its fp-fusion default will
# change; the check compiles with the same default the launchers get at run time.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

import torch  # noqa: E402
import triton  # noqa: E402

# Exit status when the AOT API or ptxas is missing (tests/test_aot.py skips on it).
EXIT_UNAVAILABLE = 2
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    _AOT_ERROR: Optional[str] = None
    if not hasattr(JITFunction, "_pack_args"):
        _AOT_ERROR = f"triton {triton.__version__}: JITFunction._pack_args missing"
except ImportError as e:  # another triton layout
    _AOT_ERROR = f"triton {triton.__version__}: AOT API not found ({e})"

from proper_kernels.triton import mixture_bwd as mb  # noqa: E402
from proper_kernels.triton import mixture_fwd as mf  # noqa: E402
from proper_kernels.reference.adapters import Adapters  # noqa: E402
from proper_kernels.runtime.target import max_shared_memory, target_arch  # noqa: E402


def aot_unavailable(arch: int = 90) -> Optional[str]:
    """None when kernels can be compiled for cuda sm_<arch> here, else why not."""
    if _AOT_ERROR:
        return _AOT_ERROR
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(arch).path
    except Exception as e:  # noqa: BLE001 - no nvidia backend / no ptxas
        return f"no ptxas for sm_{arch}: {e}"
    return None

_KERNELS = {
    mf: ("_mixture_shrink_kernel", "_mixture_expand_kernel"),
    mb: ("_mixture_bwd_rank_kernel", "_mixture_bwd_dx_kernel", "_seg_xty_kernel"),
}
# Constexprs shown in the table (when a kernel has them).
_SHOW = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_T", "GROUP_M", "HAS_W", "ADD_Y", "ATOMIC", "GATES",
         "GATED", "Y_ONES", "MODE")

DIMS = ((4096, 4096), (4096, 11008), (11008, 4096))
DECODE_T = (1, 16, 64, 256)
PREFILL_T = (1024, 8192)
VARIANTS = ("fused", "standalone", "mixture")
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


# ----------------------------------------------------------------------------- recording


class _Launch(NamedTuple):
    case: str  # what the launcher was asked to do
    kernel: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, sink: List[_Launch], case: List[str]):
        self.fn, self.sink, self.case = fn, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(_Launch(self.case[0], self.fn.__name__, self.fn, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink: List[_Launch], case: List[str]):
    saved = []
    for mod, names in _KERNELS.items():
        for n in names:
            fn = getattr(mod, n)
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                raise RuntimeError(f"{mod.__name__}.{n} is not a JITFunction (TRITON_INTERPRET set?)")
            saved.append((mod, n, fn))
            setattr(mod, n, _Recorder(fn, sink, case))
    try:
        yield
    finally:
        for mod, n, fn in saved:
            setattr(mod, n, fn)


def _problem(T, d_in, d_out, dtype, K=8, r=16, r_u=16, n_users=64, weight=True):
    """Meta tensors of one adapted projection (nothing is allocated)."""
    m = dict(device="meta", dtype=dtype)
    i32 = dict(device="meta", dtype=torch.int32)
    return dict(
        x=torch.empty(T, d_in, **m), weight=torch.empty(d_out, d_in, **m) if weight else None,
        bias=torch.empty(d_out, **m), expert_A=torch.empty(K, r, d_in, **m), expert_B=torch.empty(K, d_out, r, **m),
        router_weight=torch.empty(K, d_in, **m), user_ids=torch.empty(T, **i32), order=torch.empty(T, **i32),
        seg_offsets=torch.empty(n_users + 2, **i32), user_logit_bias=torch.empty(n_users, K, **m),
        user_A=torch.empty(n_users, r_u, d_in, **m), user_B=torch.empty(n_users, d_out, r_u, **m),
        user_router=torch.empty(n_users, K, r_u, **m),
    )


def record(dims=DIMS, decode_t=DECODE_T, prefill_t=PREFILL_T, variants=VARIANTS, dtypes=("bf16",),
           backward=True, arch: int = 90) -> List[_Launch]:
    """Every kernel launch the launchers make for these shapes on compute capability
    ``arch`` (run on meta tensors; fp64 has backward launches only: its forward is
    the torch reference)."""
    sink: List[_Launch] = []
    case = [""]
    with _recording(sink, case), target_arch(arch):
        for dt in dtypes:
            for d_in, d_out in dims:
                for T in (tuple(decode_t) + tuple(prefill_t)) if dt != "fp64" else ():
                    regime = "decode" if T <= mf.DECODE_MAX_T else "prefill"
                    for var in variants:
                        p = _problem(T, d_in, d_out, _DT[dt], weight=var != "mixture")
                        case[0] = f"fwd {var} {dt} {regime} T={T} {d_in}->{d_out}"
                        mf.mixture_fwd(p["x"], p["weight"], p["bias"], Adapters.from_kwargs(p), p["user_ids"],
                                       p["order"], d_out, variant=None if var == "mixture" else var)
                # The backward kernels depend on T only through the per-user reductions'
                # split over tokens (mixture_bwd._seg_xty: one pass when T <= SPLIT_T,
                # chunk + reduce passes above): the largest decode and prefill T cover both.
                bwd_t = {t[-1] for t in (tuple(decode_t), tuple(prefill_t)) if t}
                for T in sorted(bwd_t) if backward else ():
                    p = _problem(T, d_in, d_out, _DT[dt])
                    f32 = torch.float64 if dt == "fp64" else torch.float32  # the codes' compute dtype
                    K, r, r_u = 8, 16, 16
                    case[0] = f"bwd {dt} T={T} {d_in}->{d_out}"
                    mb.mixture_bwd(torch.empty(T, d_out, device="meta", dtype=_DT[dt]), p["x"],
                                   torch.empty(T, K * r, device="meta", dtype=f32),
                                   torch.empty(T, r_u, device="meta", dtype=f32),
                                   torch.empty(T, K, device="meta", dtype=f32),
                                   p["weight"], Adapters.from_kwargs(p), p["order"], p["seg_offsets"],
                                   (True,) * 10)
    return sink


# ----------------------------------------------------------------------------- compiling


class _Job(NamedTuple):
    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    shown: str  # the config, for the table


def _jobs(launches: List[_Launch], target: GPUTarget) -> Dict[str, Tuple[_Job, List[str]]]:
    """Distinct compilations (key -> (job, cases)), specialized exactly as JITFunction.run does."""
    backend = make_backend(target)
    out: Dict[str, Tuple[_Job, List[str]]] = {}
    binders = {}
    for ln in launches:
        fn = ln.fn
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binders[fn](*ln.args, **ln.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)
        src = ASTSource(fn, signature, constexprs, attrs)
        key = src.hash() + str(sorted(options.__dict__.items()))
        if key not in out:
            names = {k[0]: v for k, v in src.constants.items() if len(k) == 1}
            shown = [f"{fn.arg_names[i].replace('BLOCK_', 'B')}={int(v) if isinstance(v, bool) else v}"
                     for i, v in sorted(names.items()) if fn.arg_names[i] in _SHOW]
            shown += [f"w{options.num_warps}", f"s{options.num_stages}"]
            out[key] = (_Job(ln.kernel, fn, signature, constexprs, attrs, options.__dict__, " ".join(shown)), [])
        out[key][1].append(ln.case)
    return out


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict:
    res = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        res[k] = max(int(v) for v in m) if m else None
    return res


_TARGET: Optional[GPUTarget] = None
_JOBS: List[_Job] = []


def _ptxas_report(kernel, target: GPUTarget) -> dict:
    """ptxas -v on the kernel's PTX (only when triton's cache served the binary)."""
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(kernel.asm["ptx"])
        cmd = [get_ptxas(target.arch).path, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(target.arch)}", p, "-o", p + ".o"]
        return _parse_ptxas(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr)


def _compile_one(i: int) -> dict:
    job, target = _JOBS[i], _TARGET
    t0 = time.time()
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(job.fn, job.signature, job.constexprs, job.attrs), target=target,
                                    options=job.options)
    except Exception as e:  # noqa: BLE001 - reported in the table
        msg = str(e).strip().splitlines()
        return dict(error=(msg[0] if msg else type(e).__name__)[:200], secs=time.time() - t0)
    cache_dir = os.path.join(knobs.cache.dir, "proper_aot")
    cpath = os.path.join(cache_dir, kernel.hash + ".json")
    rep = _parse_ptxas(buf.getvalue())
    if rep["regs"] is None:  # triton's cache hit: ours, or run ptxas again
        try:
            with open(cpath) as f:
                rep = json.load(f)
        except (OSError, ValueError):
            rep = _ptxas_report(kernel, target)
    os.makedirs(cache_dir, exist_ok=True)
    with open(cpath, "w") as f:
        json.dump(rep, f)
    rep = dict(rep, shared=kernel.metadata.shared, secs=time.time() - t0)
    return rep


def compile_all(jobs: List[_Job], target: GPUTarget, workers: int) -> List[dict]:
    global _TARGET, _JOBS
    _TARGET, _JOBS = target, jobs
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_one(i) for i in range(len(jobs))]
    import multiprocessing as mp
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(_compile_one, range(len(jobs))))


# ----------------------------------------------------------------------------- report


def _summarize(cases: List[str]) -> str:
    """'fwd fused bf16 decode T=1 4096->4096' x n -> 'fwd fused bf16 decode T=1,16 (3 shapes)'."""
    groups: Dict[str, Tuple[set, set]] = {}
    for c in cases:
        m = re.match(r"(.*?) T=(\d+) (\S+)$", c)
        head, t, dims = (m.group(1), int(m.group(2)), m.group(3)) if m else (c, None, "")
        ts, ds = groups.setdefault(head, (set(), set()))
        if t is not None:
            ts.add(t)
        ds.add(dims)
    parts = []
    for head, (ts, ds) in groups.items():
        dims = next(iter(ds)) if len(ds) == 1 else f"{len(ds)} shapes"
        parts.append(f"{head} T={','.join(map(str, sorted(ts)))} {dims}")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    ap.add_argument("--warp-size", type=int, default=32)
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp16,fp32,fp64 (default bf16)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced set: d=4096 only, T in {64, 256, 8192}, fused + mixture, backward")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--fail-on-spill", action="store_true",
                    help="exit 1 if any kernel spills (or fails, or exceeds the shared memory)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every case of each compilation")
    a = ap.parse_args(argv)

    t0 = time.time()
    why = aot_unavailable(a.arch)
    if why:
        print(f"aot_check: unavailable: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    kw = dict(dtypes=tuple(a.dtypes.split(",")), backward=not a.no_backward, arch=a.arch)
    if a.quick:
        kw.update(dims=((4096, 4096),), decode_t=(64, 256), prefill_t=(8192,), variants=("fused", "mixture"))
    launches = record(**kw)
    target = GPUTarget("cuda", a.arch, a.warp_size)
    table = _jobs(launches, target)
    keys = list(table)
    results = compile_all([table[k][0] for k in keys], target, a.jobs)

    rows = []
    for k, res in zip(keys, results):
        job, cases = table[k]
        rows.append(dict(kernel=job.kernel.lstrip("_").replace("_kernel", ""), config=job.shown,
                         cases=_summarize(cases) if not a.verbose else " | ".join(cases), **res))
    hdr = f"{'kernel':<22} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  config / cases"
    smem_max = max_shared_memory(a.arch)
    print(f"# Triton AOT check: cuda sm_{a.arch}, {len(launches)} launches -> {len(rows)} compilations"
          f" (shared memory limit {smem_max} B per block)")
    print(hdr)
    bad = 0
    for r in rows:
        if "error" in r:
            bad += 1
            print(f"{r['kernel']:<22} COMPILE ERROR: {r['error']}  [{r['config']}] {r['cases']}")
            continue
        st, ld = r.get("spill_st") or 0, r.get("spill_ld") or 0
        spill = f"{st}/{ld}"
        smem = f"{r['shared']}"
        r["smem_over"] = r["shared"] > smem_max
        if st or ld or r["smem_over"]:
            bad += 1
            spill += "!" if (st or ld) else ""
            smem += "!" if r["smem_over"] else ""
        print(f"{r['kernel']:<22} {r['regs']:>4} {spill:>11} {r.get('stack') or 0:>5} {smem:>6}  "
              f"{r['config']}  <- {r['cases']}")
    print(f"# {bad} of {len(rows)} compilations spill, exceed the shared memory or fail; {time.time() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1)
    return 1 if (a.fail_on_spill and bad) else 0  # (2: EXIT_UNAVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
