#!/usr/bin/env python
"""One benchmark CLI for every op, provider and shape preset of proper-kernels.

    python benchmarks/run.py                       # cpu-small on CPU, square-4096 on GPU
    python benchmarks/run.py --list                # presets, providers, ops (and cases)
    python benchmarks/run.py --preset square-4096 --op decode,fwd --providers torch,triton \\
        --popularity distinct,zipf --output benchmarks/results/h100-2025-01-01-square-4096 --plot

Every provider runs on the same inputs. Before timing, each one's output (and, for
``fwdbwd`` and mlp training, its gradients) is checked against the fp32 reference
(``--no-refcheck`` skips that); a provider that fails is reported, not timed, and
makes the exit status 1. Times are medians with p20/p80 (``triton.testing.do_bench``
on GPU, L2 flushed before each call, tiny decode shapes as CUDA graph replays; wall
clock on CPU), reported with TFLOP/s, GB/s and the fraction of the roofline measured
on this device in the same run (benchmarks/roofline.py).

Imports triton, transformers and peft only inside the providers that need them.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import roofline  # noqa: E402
from presets import OP_DOC, OPS, PRESETS, Case, build_cases, default_preset  # noqa: E402
from providers import GRAD_PARAMS, PROVIDERS, REGISTRY, Provider, Skip, strip_params  # noqa: E402

from proper_kernels.testing import POPULARITY_LAWS as LAWS  # noqa: E402
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# "proper" is the e2e-only provider (the PROPER model, all users in one batch); e2e
# also runs "loop" (one user at a time) and "peft" (PEFT mixed-batch generation).
ALL_PROVIDERS = PROVIDERS + ("proper",)

COLUMNS = [
    "case", "op", "provider", "mode", "shape", "T", "d_in", "d_out", "d_ff", "K", "r", "r_u", "N", "users",
    "popularity", "dtype", "status", "refcheck", "max_err", "tol", "median_ms", "p20_ms", "p80_ms", "tflops",
    "gbps", "roofline_pct", "roofline_ms", "bytes", "flops", "tokens_per_s", "peak_mem_mb", "timer", "note",
    "device", "gpu", "torch", "triton", "git_commit", "timestamp", "command",
]


class UsageError(Exception):
    """A bad command-line value: printed with the valid choices, exit status 2."""


# --------------------------------------------------------------------------- arguments
def _split(value: Optional[str], flag: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"{flag} {value!r} is an empty list (leave the flag out for the default)")
    return items


def _check_choices(kind: str, values: Optional[Sequence[str]], valid: Sequence[str]) -> None:
    for v in values or ():
        if v not in valid:
            raise UsageError(f"unknown {kind} {v!r}; valid {kind}s: {', '.join(valid)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Check every provider against the fp32 reference, then time it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS) + "\nproviders: " + ", ".join(ALL_PROVIDERS) + "\nops: " + ", ".join(OPS),
    )
    ap.add_argument("--op", help=f"comma list of ops ({', '.join(OPS)}); default: all the preset has")
    ap.add_argument("--providers", default="all", help=f"comma list of providers or 'all' ({', '.join(ALL_PROVIDERS)}; 'proper' is e2e only)")
    ap.add_argument("--preset", help="shape preset (default: square-4096 on CUDA, cpu-small on CPU)")
    ap.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the preset's)")
    ap.add_argument("--popularity", help=f"comma list of laws or 'all' ({', '.join(LAWS)}); default: the preset's")
    ap.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--output", help="write PREFIX.csv, PREFIX.jsonl and PREFIX.txt (an extension is dropped)")
    ap.add_argument("--plot", nargs="?", const="auto", help="write a PNG (default PREFIX.png or benchmark.png); needs matplotlib")
    ap.add_argument("--refcheck", dest="refcheck", action="store_true", default=True, help="check before timing (default)")
    ap.add_argument("--no-refcheck", dest="refcheck", action="store_false", help="skip the reference check")
    ap.add_argument("--case", type=int, help="run only the case with this index (see --list --preset P)")
    ap.add_argument("--list", action="store_true", help="list presets, providers, ops (and the preset's cases)")
    ap.add_argument("--profile", metavar="DIR", help="torch.profiler trace per timed case and provider into DIR")
    ap.add_argument("--ncu", action="store_true", help="print the ncu command line profiling each case, run nothing")
    ap.add_argument("--iters", type=int, help="run each case this many times untimed (for ncu/nsys) instead of timing")
    ap.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (GPU: do_bench rep; CPU: wall)")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's, or 1 when the machine "
                    "is already busy: a loaded CPU makes multi-thread barriers dominate small ops)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--decode-table", metavar="JSON",
                    help="after a GPU run with decode rows of providers cuda and triton, write this GPU's entry "
                    "(the largest T at which cuda won) into JSON, e.g. proper_kernels/ops/decode_table.json")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    args.ops = _split(args.op, "--op")
    _check_choices("op", args.ops, OPS)
    provs = _split(args.providers, "--providers")
    args.provider_list = list(ALL_PROVIDERS) if provs == ["all"] else provs
    _check_choices("provider", args.provider_list, ALL_PROVIDERS)
    laws = _split(args.popularity, "--popularity")
    args.laws = list(LAWS) if laws == ["all"] else laws
    _check_choices("popularity law", args.laws, LAWS)
    for flag, value in (("--threads", args.threads), ("--iters", args.iters), ("--rep-ms", args.rep_ms)):
        if value is not None and not value > 0:  # "not >": NaN too
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a torch device; use cpu or cuda[:i]") from None
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if args.decode_table and not {"cuda", "triton"} <= set(args.provider_list):
        raise UsageError("--decode-table compares providers cuda and triton: include both in --providers")
    return args


# --------------------------------------------------------------------------- environment
def env_info(device: torch.device) -> Dict[str, str]:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git: leave it empty
        commit = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "triton": version("triton"),
            "git_commit": commit, "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nvtx(label: str, device: torch.device):
    if device.type == "cuda":
        return torch.cuda.nvtx.range(label)
    return contextlib.nullcontext()


def _run_untimed(step, label: str, device: torch.device, iters: int) -> str:
    """--iters: run the step ``iters`` times inside an NVTX range (for a profiler); the row's status."""
    with _nvtx(label, device):
        for _ in range(iters):
            step()
        _sync(device)
    return f"ran {iters} untimed"


# --------------------------------------------------------------------------- inputs
def make_layers(case: Case, dtype, device, seed: int):
    """(layers: list of parameter dicts, x, user_ids, plan, dy) for a case."""
    from proper_kernels import plan as make_plan
    from proper_kernels.testing import make_mixture_inputs

    if case.op == "mlp":
        shapes = [(case.d_in, case.d_ff), (case.d_in, case.d_ff), (case.d_ff, case.d_in)]
    else:
        shapes = [(case.d_in, case.d_out)]
    layers = []
    first = None
    for i, (d_in, d_out) in enumerate(shapes):
        inp = make_mixture_inputs(case.T, d_in, d_out, K=case.K, r=case.r, r_u=case.r_u, N=case.N, law=case.law,
                                  dtype=dtype, device=device, seed=seed * 1000 + case.index * 10 + i)
        if first is None:
            first = inp
        layers.append({k: v for k, v in inp.items() if k not in ("x", "user_ids")})
    x, ids = first["x"], first["user_ids"]
    pl = make_plan(ids, case.N)
    g = torch.Generator().manual_seed(seed + 7)
    d_final = shapes[-1][1]
    dy = torch.randn(case.T, d_final, generator=g).to(device=device, dtype=dtype) if case.grad else None
    return layers, x, ids, pl, dy


def to_dtype(layers, dtype):
    return [{k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in p.items()} for p in layers]


def make_step(case: Case, provider, layers, x, ids, pl, dy):
    """The timed callable: forward (no grad), or forward + autograd.grad of every
    adapter/router tensor and x. Returns a tuple of tensors (y, grads...)."""
    layers = [strip_params(p, provider.work) for p in layers]
    if not case.grad:
        fn = provider.compose(case, layers, ids, pl)

        def step():
            with torch.no_grad():
                return (fn(x),)
        return step
    x_leaf = x.detach().requires_grad_(True)
    leaves = [{k: (v.detach().requires_grad_(True) if k in GRAD_PARAMS and isinstance(v, torch.Tensor) else v)
               for k, v in p.items()} for p in layers]
    fn = provider.compose(case, leaves, ids, pl)
    wrt = [x_leaf] + [p[k] for p in leaves for k in GRAD_PARAMS if isinstance(p[k], torch.Tensor)]

    def step():
        y = fn(x_leaf)
        return (y,) + tuple(torch.autograd.grad(y, wrt, dy))
    return step


def output_names(case: Case, layers, work: str) -> List[str]:
    names = ["y"]
    if case.grad:
        names.append("dx")
        for i, p in enumerate(strip_params(q, work) for q in layers):
            for k in GRAD_PARAMS:
                if isinstance(p[k], torch.Tensor):
                    names.append(f"d{k}" + (f"[{('gate', 'up', 'down')[i]}]" if case.op == "mlp" else ""))
    return names


# The floor of the refcheck tolerance in units of eps(dtype) * max(|ref|, 1) (Oracle).
TOL_EPS = 4


class Oracle:
    """The fp32 reference outputs of a case and the error of the same-dtype plain
    PyTorch computation (the ``loop`` provider in the benchmark dtype), per work kind.

    Tolerance (after flash-attention's criterion: a multiple of the error of the plain
    computation in the same dtype): a provider passes when, for each output tensor,
    max|out - ref| <= 3 * max|loop_in_dtype - ref| + TOL_EPS eps(dtype) max(|ref|, 1).
    The eps term is only a floor for outputs the same-dtype computation gets (nearly)
    exactly right; it must stay a few ulps: at 64 eps it was half of max|y| in bf16,
    and a provider that left out the whole expert mixture passed.
    """

    def __init__(self, case, layers, x, ids, pl, dy):
        self.case, self.layers, self.x, self.ids, self.pl, self.dy = case, layers, x, ids, pl, dy
        self._cache = {}

    def get(self, work: str):
        if work not in self._cache:
            f32 = torch.float32
            layers32 = to_dtype(self.layers, f32)
            dy32 = self.dy.to(f32) if self.dy is not None else None

            class _W:  # the reference/loop providers with the requested work
                pass
            ref = _W()
            ref.__dict__.update(name="reference", work=work, compose=REGISTRY["reference"].compose)
            ref_out = make_step(self.case, ref, layers32, self.x.to(f32), self.ids, self.pl, dy32)()
            ref_out = [t.detach().float() for t in ref_out]
            loop = _W()
            loop.__dict__.update(name="loop", work=work, compose=REGISTRY["loop"].compose)
            base_out = make_step(self.case, loop, self.layers, self.x, self.ids, self.pl, self.dy)()
            base_err = [float((b.detach().float() - r).abs().max()) if r.numel() else 0.0
                        for b, r in zip(base_out, ref_out)]
            self._cache[work] = (ref_out, base_err)
        return self._cache[work]

    def check(self, work: str, out, names, dtype):
        ref_out, base_err = self.get(work)
        if len(out) != len(ref_out):
            return False, float("nan"), float("nan"), f"{len(out)} outputs, expected {len(ref_out)}"
        eps = torch.finfo(dtype).eps
        worst = (0.0, 0.0, "")
        for name, o, r, be in zip(names, out, ref_out, base_err):
            if tuple(o.shape) != tuple(r.shape):
                return False, float("nan"), float("nan"), f"{name}: shape {list(o.shape)} != {list(r.shape)}"
            if r.numel() == 0:
                continue
            err = float((o.detach().float() - r).abs().max())
            tol = 3.0 * be + TOL_EPS * eps * max(float(r.abs().max()), 1.0)
            if not math.isfinite(err) or err > tol:
                return False, err, tol, f"{name}: max err {err:.3g} > tol {tol:.3g}"
            if err / tol >= (worst[0] / worst[1] if worst[1] else -1):
                worst = (err, tol, name)
        return True, worst[0], worst[1], ""


# --------------------------------------------------------------------------- timing
def _quantiles(times_ms: List[float]):
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return [float(v) for v in q]


def _capture_graph(fn):
    """One call of fn captured in a CUDA graph (after a warmup call on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def time_fn(fn, device: torch.device, case: Case, rep_ms: Optional[float], graph_safe: bool = True):
    """(median, p20, p80 in ms, timer name).

    GPU: ``triton.testing.do_bench``, which flushes L2 before every call, so every
    call starts from HBM as in a model, where each layer has its own weights. Tiny
    decode shapes (T <= 64) of providers without host syncs: one call captured in a
    CUDA graph and its replay timed by the same do_bench (cold L2, no launch
    overhead), falling back to do_bench of the step when capture fails. Not
    ``do_bench_cudagraph``: it replays back to back with no flush, so W0 and the
    adapters of a 4096x4096 decode (~36 MB at T=1) stay in an H100's 50 MB L2.
    CPU: wall clock (warmup, then repeats within ``rep_ms``, at least 3).
    """
    if case.op == "e2e":
        # Whole model steps: one warmup, then at least one and at most 5 steps within
        # the budget (default 2 s; --rep-ms raises it).
        budget = (rep_ms or 2000.0) / 1e3
        fn()
        _sync(device)
        ts = []
        start = time.perf_counter()
        while not ts or (time.perf_counter() - start < budget and len(ts) < 5):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append((time.perf_counter() - t0) * 1e3)
        return (*_quantiles(ts), "wall")
    if device.type == "cuda":
        import triton.testing as tt

        rep = rep_ms or 100.0
        if case.mode == "decode" and case.T <= 64 and graph_safe:
            try:
                graph = _capture_graph(fn)
            except Exception:  # noqa: BLE001 - not capturable (host syncs): plain do_bench
                torch.cuda.synchronize()
            else:
                res = tt.do_bench(graph.replay, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
                return (*res, "cudagraph")
        res = tt.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return (*res, "do_bench")
    budget = (rep_ms or 100.0) / 1e3
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    warm = 1 if first > budget / 4 else 2
    for _ in range(warm - 1):
        fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - start < budget and len(ts) < 100):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        if len(ts) >= 3 and time.perf_counter() - start > 4 * budget:
            break
    return (*_quantiles(ts), "wall")


def cost_of(case: Case, work: str, elem_bytes: int, n_active: int):
    if case.op == "e2e":
        return None
    K = case.K if work == "full" else 0
    r_u = case.r_u if work in ("full", "users") else 0
    if case.op == "mlp":
        return roofline.mlp_cost(case.T, case.d_in, case.d_ff, K=K, r=case.r, r_u=r_u, n_active=n_active,
                                 elem_bytes=elem_bytes, backward=case.grad)
    return roofline.mixture_cost(case.T, case.d_in, case.d_out, K=K, r=case.r, r_u=r_u, n_active=n_active,
                                 elem_bytes=elem_bytes, backward=case.grad)


def profile_case(fn, device, label: str, outdir: str) -> None:
    """torch.profiler over 3 calls: a Chrome/Perfetto trace and the top-kernels table."""
    from torch.profiler import ProfilerActivity, profile, record_function

    os.makedirs(outdir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            with record_function(label):
                fn()
        _sync(device)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    path = os.path.join(outdir, f"{safe}.json")
    prof.export_chrome_trace(path)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n[profile] {label} -> {path}  (top kernels/ops by self time; '# of Calls' = launches over 3 calls)")
    try:
        print(prof.key_averages().table(sort_by=key, row_limit=12))
    except Exception:  # noqa: BLE001 - an older/newer profiler without that key
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


# --------------------------------------------------------------------------- output
def _fmt(v, nd=3):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}g}" if abs(v) < 1 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def summary_table(rows: List[dict]) -> str:
    head = ["case", "op", "mode", "shape", "law", "provider", "status", "median ms", "p20", "p80",
            "TFLOP/s", "GB/s", "%roof", "check", "note"]
    lines = []
    for r in rows:
        status = r["status"] if not r["status"].startswith("skipped") else "skipped"
        check = r["refcheck"]
        if r["refcheck"] == "pass" and r["max_err"] != "":
            check = f"pass {r['max_err']:.1e}"
        note = r["note"] if r["status"] in ("ok",) else r["status"]
        if r["tokens_per_s"] not in ("", None):
            note = f"{r['tokens_per_s']:,.0f} tok/s" + (f"; {r['note']}" if r["note"] else "")
        lines.append([str(r["case"]), r["op"], r["mode"], r["shape"], r["popularity"], r["provider"], status,
                      _fmt(r["median_ms"], 4), _fmt(r["p20_ms"], 4), _fmt(r["p80_ms"], 4), _fmt(r["tflops"]),
                      _fmt(r["gbps"]), _fmt(r["roofline_pct"], 2), check, note])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def _json_value(v):
    """NaN and infinities (a failed check's error) are not JSON: null instead."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_outputs(prefix: str, rows: List[dict], header: str, table: str) -> List[str]:
    for ext in (".csv", ".jsonl", ".txt", ".png"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    with open(prefix + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: _json_value(r.get(k, "")) for k in COLUMNS}, allow_nan=False) + "\n")
    with open(prefix + ".txt", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    return [prefix + ".csv", prefix + ".jsonl", prefix + ".txt"]


def plot(rows: List[dict], path: str) -> None:
    """One panel per op: median ms per case (x) and provider (one marker series each), log y;
    e2e: tokens/s (its loop provider times only some of the users, so ms do not compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["status"] == "ok" and r["median_ms"] not in ("", None)]
    ops = [op for op in OPS if any(r["op"] == op for r in timed)]
    if not ops:
        print("[plot] nothing was timed: no plot written")
        return
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in timed if r["op"] == op]
        cases = sorted({r["case"] for r in rs})
        labels = {r["case"]: f"#{r['case']} {r['mode']} T={r['T']} {r['popularity']}" for r in rs}
        metric = "tokens_per_s" if op == "e2e" else "median_ms"
        for prov in [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in rs)]:
            pts = [(cases.index(r["case"]), r[metric]) for r in rs if r["provider"] == prov]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-", label=prov)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([labels[c] for c in cases], rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s" if op == "e2e" else "median ms")
        ax.set_title(f"{op}: {OP_DOC[op]}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"[plot] wrote {path}")


# --------------------------------------------------------------------------- listing
def list_all(args, device) -> None:
    print("presets:")
    for name, spec in PRESETS.items():
        print(f"  {name:14s} {spec['doc']}")
    print(f"  (default here: {default_preset(device.type)})")
    print("\nops:")
    for op in OPS:
        print(f"  {op:14s} {OP_DOC[op]}")
    print("\nproviders:")
    for name, p in REGISTRY.items():
        print(f"  {name:14s} {p.doc}")
    print(f"  {'proper':14s} e2e only: the PROPER model with every user in one batch "
          "(e2e also runs loop: one user at a time, peft: PEFT mixed-batch generation)")
    print("\npopularity laws: " + ", ".join(LAWS))
    preset = args.preset or default_preset(device.type)
    cases = build_cases(preset, args.ops, args.laws, device.type)
    print(f"\ncases of {preset} (--case N runs one):")
    for c in cases:
        print(f"  {c.index:3d}  {c.op:7s} {c.mode:10s} {c.shape():48s} {c.law}")


def ncu_lines(args, cases, preset, dtype_name) -> List[str]:
    out = []
    # The same --popularity as this call: case indices depend on it.
    pop = f" --popularity {args.popularity}" if args.popularity else ""
    for c in cases:
        for prov in args.provider_list:
            # e2e is not profiled per kernel; skip the providers that only skip this case
            # (the base checks: e2e-only, decode-only, forward-only; not the device's).
            if c.op == "e2e" or prov not in REGISTRY or Provider.skip_reason(REGISTRY[prov], c, None):
                continue
            if prov == "triton":
                # The fused ops push these NVTX ranges (proper_kernels/ops/fused.py).
                ranges = ['--nvtx-include "proper_kernels::mixture_fwd/"']
                if c.grad:
                    ranges.append('--nvtx-include "proper_kernels::mixture_bwd/"')
                kern = '-k "regex:mixture|seg_xty" '
            else:
                ranges = [f'--nvtx-include "{bench_label(c, prov)}/"']
                kern = '-k "regex:lora_mixture" ' if prov.startswith("cuda") else ""
            out.append(
                f"ncu --nvtx {' '.join(ranges)} {kern}--set full -o ncu-{c.op}-case{c.index}-{prov} "
                f"python benchmarks/run.py --preset {preset} --op {c.op} --providers {prov} --case {c.index} "
                f"--dtype {dtype_name}{pop} --no-refcheck --iters 3 --no-progress"
            )
    return out


def bench_label(case: Case, provider: str) -> str:
    return f"bench::{case.op}::{provider}::case{case.index}"


# --------------------------------------------------------------------------- main
def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch.cuda.is_available() is False")
    if args.list:
        list_all(args, device)
        return 0
    if args.decode_table and device.type != "cuda" and not args.ncu:
        # Refuse before timing anything: the table's entry needs the cuda provider.
        print("error: --decode-table needs a CUDA device (it times the cuda and triton providers)", file=sys.stderr)
        return 2
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
            return 2
    preset = args.preset or default_preset(device.type)
    spec = PRESETS[preset]
    dtype_name = args.dtype or spec.get("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    dtype_name = str(dtype).replace("torch.", "")
    cases = build_cases(preset, args.ops, args.laws, device.type)
    if args.ops and not cases:
        have = ", ".join(spec["ops"])
        raise UsageError(f"preset {preset!r} has no cases for op(s) {', '.join(args.ops)}; its ops: {have}")
    if args.case is not None:
        picked = [c for c in cases if c.index == args.case]
        if not picked:
            idx = [c.index for c in cases]
            valid = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ", ".join(map(str, idx))
            raise UsageError(f"--case {args.case} is not a case of {preset}"
                             + (f" with --op {args.op}" if args.ops else "") + f" (valid: {valid}; see --list)")
        cases = picked
    if args.ncu:
        print("\n".join(ncu_lines(args, cases, preset, dtype_name)))
        return 0

    threads_note = ""
    if device.type == "cpu":
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if args.threads:
            torch.set_num_threads(args.threads)
        elif torch.get_num_threads() > 1 and load > cores - 0.5:
            torch.set_num_threads(1)
            threads_note = f" (load average {load:.1f} on {cores} cores: 1 thread; --threads overrides)"
        threads_note = f"  threads={torch.get_num_threads()}" + threads_note
    env = env_info(device)
    env["command"] = "python benchmarks/run.py " + shlex.join(args.argv)
    t_start = time.perf_counter()
    # The GEMM ceiling of the run's dtype (the roofline uses it) and fp32 for reference.
    ceiling = roofline.measure_device(device, dtypes=tuple(dict.fromkeys((dtype, torch.float32))))
    header_lines = [
        f"proper-kernels benchmark  preset={preset}  dtype={dtype_name}  device={device}"
        + (f" ({env['gpu']})" if env["gpu"] else "") + f"  torch={env['torch']}  triton={env['triton'] or '-'}"
        + f"  commit={env['git_commit'] or '-'}" + threads_note,
        f"command: {env['command']}",
        f"measured ceilings: copy {ceiling.bandwidth / 1e9:.1f} GB/s; GEMM "
        + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceiling.gemm_rate.items()),
        "refcheck: " + (f"on (fp32 reference; tol = 3x same-dtype torch error + {TOL_EPS} eps max|ref|)"
                        if args.refcheck else "off"),
    ]
    header = "\n".join(header_lines)
    print(header, flush=True)

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases), desc="cases", disable=args.no_progress, file=sys.stderr, leave=False)
    except ImportError:
        bar = None
    rows: List[dict] = []
    skipped: Dict[str, str] = {}
    elem = torch.finfo(dtype).bits // 8
    for case in cases:
        case.torch_dtype = dtype
        if bar is not None:
            bar.set_postfix_str(f"#{case.index} {case.op} T={case.T} {case.law}")
        rows.extend(run_case(case, args, device, dtype, dtype_name, elem, ceiling, env, skipped))
        if bar is not None:
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()

    table = summary_table(rows)
    print()
    print(table)
    if skipped:
        print("\nskipped providers:")
        for k, why in skipped.items():
            print(f"  {why}")
    elapsed = time.perf_counter() - t_start
    n_failed = sum(r["status"].startswith(("refcheck failed", "error")) for r in rows)
    print(f"\n{len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} timed, {n_failed} failed, "
          f"in {elapsed:.1f} s")
    prefix = None
    if args.output:
        files = write_outputs(args.output, rows, header, table)
        prefix = os.path.splitext(files[0])[0]
        print("wrote " + ", ".join(files))
    if args.plot is not None:
        path = args.plot if args.plot != "auto" else ((prefix or "benchmark") + ".png")
        plot(rows, path)
    if args.decode_table:
        try:
            major, minor = torch.cuda.get_device_capability(device)
            entry = update_decode_table(args.decode_table, rows, f"sm_{major}{minor}", env, args.argv)
        except ValueError as exc:
            print(f"error: --decode-table: {exc}", file=sys.stderr)
            return 2
        print(f"decode table {args.decode_table}: {entry['arch']} {entry['dtype']} max_T = {entry['max_T']}, "
              f"launch = {entry['launch']}")
    return 1 if n_failed else 0


def decode_crossover(rows: List[dict]) -> Dict[str, Dict[str, object]]:
    """Per dtype, from the decode rows: the largest measured T at which the CUDA
    kernel (its faster launch mode, providers cuda / cuda-one) was at least as fast as
    triton on every case of that T (all shapes and popularity laws) and at every
    smaller measured T (0 if it lost at the smallest); the launch mode ("two" or
    "one") with the lower summed time over those cases (over all cases when
    max_T = 0); and the median times behind it."""
    mode_of = {"cuda": "two", "cuda-one": "one"}
    times: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["op"] == "decode" and r["status"] == "ok" and r["provider"] in ("cuda", "cuda-one", "triton"):
            times.setdefault((r["dtype"], r["T"], r["case"]), {})[r["provider"]] = r["median_ms"]
    per_dtype: Dict[str, Dict[int, List[Dict[str, float]]]] = {}
    for (dtype, T, _case), t in times.items():
        if "triton" in t and set(t) & set(mode_of):
            per_dtype.setdefault(dtype, {}).setdefault(T, []).append(t)
    out = {}
    for dtype, by_T in per_dtype.items():
        max_T = 0
        for T in sorted(by_T):
            if not all(min(t[p] for p in mode_of if p in t) <= t["triton"] for t in by_T[T]):
                break
            max_T = T
        cases = [t for T in sorted(by_T) if max_T == 0 or T <= max_T for t in by_T[T]]
        totals = {mode_of[p]: sum(t[p] for t in cases) for p in mode_of if all(p in t for t in cases)}
        launch = min(totals, key=totals.get) if totals else "two"
        evidence = {str(T): [{p: round(v, 5) for p, v in sorted(t.items())} for t in by_T[T]] for T in sorted(by_T)}
        out[dtype] = {"max_T": max_T, "launch": launch, "evidence_ms": evidence}
    return out


def update_decode_table(path: str, rows: List[dict], arch: str, env: Dict[str, str], argv: List[str]) -> dict:
    """Write the entry (arch, dtype) of this run into the dispatch table at `path`
    (proper_kernels/ops/decode_table.json format), replacing an older one; returns it."""
    found = decode_crossover(rows)
    if not found:
        raise ValueError("no decode case has timed rows of both providers cuda and triton "
                         "(see the skipped providers above)")
    table = {"about": "", "entries": []}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    entry = None
    for dtype, res in sorted(found.items()):
        entry = {
            "arch": arch, "dtype": dtype, "max_T": res["max_T"], "launch": res["launch"], "measured": True,
            "source": f"python benchmarks/run.py {' '.join(argv)} on {env['gpu']} (torch {env['torch']}, "
                      f"triton {env['triton']}, commit {env['git_commit'] or '-'}, {env['timestamp']})",
            "evidence_ms": res["evidence_ms"],
        }
        table["entries"] = [e for e in table["entries"] if (e["arch"], e["dtype"]) != (arch, dtype)] + [entry]
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return entry


def run_case(case: Case, args, device, dtype, dtype_name, elem, ceiling, env, skipped) -> List[dict]:
    """Check then time every requested provider on one case; one row per provider."""
    rows = []
    base_row = dict(case=case.index, op=case.op, mode=case.mode, shape=case.shape(), T=case.T, d_in=case.d_in,
                    d_out=case.d_out, d_ff=case.d_ff, K=case.K, r=case.r, r_u=case.r_u, N=case.N,
                    popularity=case.law, dtype=dtype_name, **env)
    if case.op == "e2e":
        return run_e2e_case(case, args, device, dtype, base_row, skipped)
    layers, x, ids, pl, dy = make_layers(case, dtype, device, args.seed)
    n_active = int(pl.active_users.numel())
    oracle = Oracle(case, layers, x, ids, pl, dy) if args.refcheck else None
    for name in [p for p in args.provider_list if p in REGISTRY]:
        prov = REGISTRY[name]
        row = dict(base_row, provider=name, users=n_active, status="", refcheck="", max_err="", tol="",
                   median_ms="", p20_ms="", p80_ms="", tflops="", gbps="", roofline_pct="", roofline_ms="",
                   bytes="", flops="", tokens_per_s="", peak_mem_mb="", timer="", note="")
        why = prov.skip_reason(case, device)
        if why:
            row["status"] = "skipped: " + why
            skipped.setdefault(f"{name}:{why}", why)
            rows.append(row)
            continue
        row["note"] = prov.note
        label = bench_label(case, name)
        try:
            if name == "torch-compile":
                torch._dynamo.reset()  # a fresh compile per case (no stale recompile limits)
            step = make_step(case, prov, layers, x, ids, pl, dy)
            if args.refcheck:
                out = step()
                _sync(device)
                ok, err, tol, msg = oracle.check(prov.work, out, output_names(case, layers, prov.work), dtype)
                row.update(refcheck="pass" if ok else "fail", max_err=err, tol=tol)
                del out
                if not ok:
                    row["status"] = f"refcheck failed: {msg}"
                    rows.append(row)
                    continue
            else:
                row["refcheck"] = "off"
            if args.iters:
                row["status"] = _run_untimed(step, label, device, args.iters)
                rows.append(row)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            with _nvtx(label, device):
                med, p20, p80, timer = time_fn(step, device, case, args.rep_ms, prov.graph_safe)
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            cost = cost_of(case, prov.work, elem, n_active)
            roof = roofline.roofline_ms(cost, ceiling, dtype)
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, timer=timer, bytes=cost["bytes"],
                       flops=cost["flops"], tflops=cost["flops"] / (med * 1e-3) / 1e12,
                       gbps=cost["bytes"] / (med * 1e-3) / 1e9, roofline_ms=roof, roofline_pct=100.0 * roof / med,
                       tokens_per_s=case.T / (med * 1e-3) if case.op == "mlp" else "")
            if args.profile:
                with _nvtx(label, device):
                    profile_case(step, device, f"{label}-T{case.T}-{case.law}", args.profile)
        except Skip as exc:
            row["status"] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - report and go on with the next provider
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    return rows


def run_e2e_case(case, args, device, dtype, base_row, skipped) -> List[dict]:
    import e2e

    rows = []
    wanted = [p for p in e2e.E2E_PROVIDERS[case.mode] if p in args.provider_list]
    why = e2e.integration_skip_reason()
    for name in wanted:
        row = dict(base_row, provider=name, users=case.N, status="", refcheck="n/a", max_err="", tol="",
                   median_ms="", p20_ms="", p80_ms="", tflops="", gbps="", roofline_pct="", roofline_ms="",
                   bytes="", flops="", tokens_per_s="", peak_mem_mb="", timer="", note="")
        if name == "peft":
            row["note"] = "PEFT: users' LoRAs only (no experts)"
        elif name == "loop":
            n = e2e.loop_users(case)
            row["note"] = "one user at a time (grad accumulation)" + (f"; {n} of {case.N} users timed" if n < case.N else "")
        else:
            row["note"] = "all users in one mixed batch"
        if why:
            row["status"] = "skipped: " + why
            skipped.setdefault(why, why)
            rows.append(row)
            continue
        if name == "peft":
            try:
                import peft  # noqa: F401
            except ImportError:
                row["status"] = "skipped: peft: not installed"
                rows.append(row)
                continue
        try:
            step = e2e.make_fn(case, name, case.mode, device, dtype)
            if args.iters:
                row["status"] = _run_untimed(step, bench_label(case, name), device, args.iters)
                rows.append(row)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with _nvtx(bench_label(case, name), device):
                med, p20, p80, timer = time_fn(step, device, case, args.rep_ms)
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, timer=timer,
                       tokens_per_s=e2e.tokens_per_step(case, case.mode, name) / (med * 1e-3))
            if args.profile:
                profile_case(step, device, f"{bench_label(case, name)}-{case.mode}", args.profile)
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
