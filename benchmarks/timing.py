"""How the benchmark times a step: medians with p20/p80, CUDA graphs, profiling.

GPU: ``triton.testing.do_bench``, which flushes L2 before every call; tiny decode
shapes (T <= 64) of providers without host syncs as the replay of one call captured in
a CUDA graph, timed by the same do_bench. CPU: wall-clock quantiles. ``--iters`` runs a
step untimed inside an NVTX range (for ncu/nsys); ``--profile`` writes a torch.profiler
trace.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import List, Optional

import torch

from presets import Case


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nvtx(label: str, device: torch.device):
    if device.type == "cuda":
        return torch.cuda.nvtx.range(label)
    return contextlib.nullcontext()


def run_untimed(step, label: str, device: torch.device, iters: int) -> str:
    """--iters: run the step ``iters`` times inside an NVTX range (for a profiler); the row's status."""
    with nvtx(label, device):
        for _ in range(iters):
            step()
        sync(device)
    return f"ran {iters} untimed"


def quantiles(times_ms: List[float]):
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return [float(v) for v in q]


def capture_graph(fn):
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
        sync(device)
        ts = []
        start = time.perf_counter()
        while not ts or (time.perf_counter() - start < budget and len(ts) < 5):
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append((time.perf_counter() - t0) * 1e3)
        return (*quantiles(ts), "wall")
    if device.type == "cuda":
        import triton.testing as tt

        rep = rep_ms or 100.0
        if case.mode == "decode" and case.T <= 64 and graph_safe:
            try:
                graph = capture_graph(fn)
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
    return (*quantiles(ts), "wall")


def profile_case(fn, device, label: str, outdir: str) -> None:
    """torch.profiler over 3 calls: a Chrome/Perfetto trace and the top-kernels table."""
    from torch.profiler import ProfilerActivity, profile, record_function

    os.makedirs(outdir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            with record_function(label):
                fn()
        sync(device)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    path = os.path.join(outdir, f"{safe}.json")
    prof.export_chrome_trace(path)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n[profile] {label} -> {path}  (top kernels/ops by self time; '# of Calls' = launches over 3 calls)")
    try:
        print(prof.key_averages().table(sort_by=key, row_limit=12))
    except Exception:  # noqa: BLE001 - an older/newer profiler without that key
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
