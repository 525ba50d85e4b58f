"""The byte/flop model of our ops and the device's measured ceilings.

``mixture_cost`` is the one place that says how many bytes an op must move and how
many FLOPs it must do (tests/test_bench_roofline.py checks it against the same
numbers worked by hand: square-4096 decode at T=64, 64 distinct users, 18.9 MB of
adapters); ``case_cost`` applies it to a benchmark case. ``measure_device`` times a
large copy and a large GEMM in this process, and :class:`CaseCeilings` the same at each
case's own shape, so a measurement is reported against the machine it ran on, not a
datasheet, and against a ceiling a small shape running from cache cannot beat.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = ["mixture_cost", "mlp_cost", "case_cost", "case_gemms", "DeviceCeiling", "measure_device", "CaseCeilings",
           "best_of", "roofline_ms"]


def mixture_cost(T: int, d_in: int, d_out: int, *, K: int, r: int, r_u: int, n_active: int,
                 elem_bytes: int, include_base: bool = True, backward: bool = False,
                 router: bool = True, user_router: bool = True) -> Dict[str, float]:
    """Minimum bytes moved and FLOPs done by one adapted linear over T tokens.

    Forward, the op must read x [T, d_in] and write y [T, d_out] once, read the K group
    experts (A_g [K, r, d_in], B_g [K, d_out, r]) and the router W_r [K, d_in] once,
    and read the adapters of the ``n_active`` users present in the batch (A_u, B_u,
    V_u [K, r_u] and c_u [K] each) once; with the base included also W0 [d_out, d_in]
    and b [d_out]. The user ids (4 B per token) are counted too. Rank-space
    intermediates are assumed to stay on chip (zero bytes).

    FLOPs forward: ``2 T (K r + r_u)(d_in + d_out)`` for the shrinks and expands,
    ``2 T K d_in`` for the router, ``2 T K r_u`` for the LoRA-aware router, and
    ``2 T d_in d_out`` for the base when included. The softmax and the gate multiply
    are ignored (O(T K r)).

    Backward (``backward=True`` adds it to the forward): the weight gradients of every
    adapter and router term and dx cost twice the forward FLOPs of those terms; the
    frozen base adds ``2 T d_in d_out`` for dx only. Bytes: read dy [T, d_out] and x
    again, write dx [T, d_in], read the adapters (and W0) again and write one gradient
    per adapter element.

    Args:
        T, d_in, d_out: tokens and the linear's shape.
        K, r: group experts and their rank (K = 0: none).
        r_u: user rank (0: no user adapters); n_active: distinct users in the batch.
        elem_bytes: bytes per element of the data dtype (2 for bf16/fp16, 4 for fp32).
        include_base, backward, router, user_router: which terms the op computes.

    Returns:
        {"bytes": float, "flops": float, "adapter_bytes": float}.
    """
    e = float(elem_bytes)
    Kr = K * r
    n_router = K if (K and router) else 0
    v = K * r_u if (K and r_u and user_router) else 0
    expert_el = Kr * (d_in + d_out) + n_router * d_in
    user_el = n_active * (r_u * (d_in + d_out) + v + (K if K else 0)) if r_u else n_active * K
    adapter_el = expert_el + user_el
    base_el = d_in * d_out + d_out if include_base else 0
    act_el = T * d_in + T * d_out
    bytes_fwd = e * (adapter_el + base_el + act_el) + 4.0 * T
    flops_fwd_adapter = 2.0 * T * (Kr + r_u) * (d_in + d_out) + 2.0 * T * n_router * d_in + 2.0 * T * v
    flops_base = 2.0 * T * d_in * d_out if include_base else 0.0
    flops = flops_fwd_adapter + flops_base
    nbytes = bytes_fwd
    if backward:
        flops += 2.0 * flops_fwd_adapter + flops_base
        nbytes += e * (T * d_out + 2 * T * d_in + 2 * adapter_el + base_el) + 4.0 * T
    return {"bytes": nbytes, "flops": flops, "adapter_bytes": e * adapter_el}


def mlp_cost(T: int, d_model: int, d_ff: int, *, K: int, r: int, r_u: int, n_active: int,
             elem_bytes: int, backward: bool = False) -> Dict[str, float]:
    """Bytes and FLOPs of a gated MLP ``down(silu(gate(x)) * up(x))`` of adapted linears.

    The sum of :func:`mixture_cost` over gate [d_model -> d_ff], up [d_model -> d_ff]
    and down [d_ff -> d_model] (base included), plus the elementwise SiLU-and-multiply
    (read 2 T d_ff, write T d_ff; doubled with the backward). Each projection is
    counted as reading its input and writing its output, as unfused linears must.
    """
    parts = [mixture_cost(T, d_model, d_ff, K=K, r=r, r_u=r_u, n_active=n_active, elem_bytes=elem_bytes, backward=backward),
             mixture_cost(T, d_model, d_ff, K=K, r=r, r_u=r_u, n_active=n_active, elem_bytes=elem_bytes, backward=backward),
             mixture_cost(T, d_ff, d_model, K=K, r=r, r_u=r_u, n_active=n_active, elem_bytes=elem_bytes, backward=backward)]
    ew = 3.0 * T * d_ff * elem_bytes * (2 if backward else 1)
    ew_flops = 5.0 * T * d_ff * (2 if backward else 1)
    return {"bytes": sum(p["bytes"] for p in parts) + ew,
            "flops": sum(p["flops"] for p in parts) + ew_flops,
            "adapter_bytes": sum(p["adapter_bytes"] for p in parts)}


@dataclass
class DeviceCeiling:
    """Measured ceilings of the device: copy bandwidth (bytes/s) and GEMM rate per dtype (FLOP/s)."""
    device: str
    bandwidth: float
    gemm_rate: Dict[str, float]

    def rate(self, dtype: torch.dtype) -> float:
        name = str(dtype).replace("torch.", "")
        return self.gemm_rate.get(name) or max(self.gemm_rate.values())


def roofline_ms(cost: Dict[str, float], ceiling: DeviceCeiling, dtype: torch.dtype) -> float:
    """max(bytes / bandwidth, flops / GEMM rate), in milliseconds."""
    return 1e3 * max(cost["bytes"] / ceiling.bandwidth, cost["flops"] / ceiling.rate(dtype))


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    """The fastest of at least ``reps`` calls of fn() after a warmup, in seconds: a
    ceiling is the best the device did. On CUDA every call starts with L2 flushed
    (``triton.testing.do_bench`` over 50 ms, as the timed rows; CUDA events without
    triton); on CPU calls repeat for at least 10 ms (tiny copies take microseconds)."""
    fn()
    if device.type == "cuda":
        try:
            import triton.testing as tt
        except ImportError:
            tt = None
        if tt is not None:
            return tt.do_bench(fn, warmup=5, rep=50, return_mode="min") / 1e3
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < 0.01 and len(times) < 1000):
        if device.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            fn()
            ev1.record()
            torch.cuda.synchronize()
            times.append(ev0.elapsed_time(ev1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def _copy_bandwidth(device: torch.device, nbytes: float, reps: int) -> float:
    """Bytes/s of a tensor copy that reads nbytes/2 and writes nbytes/2 (working set nbytes)."""
    n = max(1, int(nbytes) // 8)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 8.0 * n / _best_seconds(lambda: dst.copy_(src), device, reps)


def _gemm_rate(device: torch.device, dtype: torch.dtype, M: int, K: int, N: int, reps: int) -> float:
    """FLOP/s of F.linear(x [M, K], W [N, K]) in dtype."""
    a = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    return 2.0 * M * K * N / _best_seconds(lambda: torch.nn.functional.linear(a, w), device, reps)


_DEVICE_CEILINGS: Dict[tuple, DeviceCeiling] = {}


def measure_device(device: torch.device, dtypes=(torch.bfloat16, torch.float32)) -> DeviceCeiling:
    """Copy bandwidth (one large tensor copy: read + write) and the GEMM rate per dtype,
    measured once per process (a second CLI run in the same process reuses them).

    On CUDA: a 1 GiB copy and 8192^3 GEMMs; on CPU: a 64 MiB copy and 1024^3 GEMMs
    (512^3 for 16-bit dtypes), so the measurement costs about a second on 2 cores.
    Measure the dtype the roofline will be asked about: ``DeviceCeiling.rate`` of an
    unmeasured dtype falls back to the fastest measured rate.
    """
    key = (str(device), tuple(dtypes), torch.get_num_threads())
    if key in _DEVICE_CEILINGS:
        return _DEVICE_CEILINGS[key]
    cuda = device.type == "cuda"
    bandwidth = _copy_bandwidth(device, 2 << 30 if cuda else 128 << 20, 10 if cuda else 5)
    rates = {}
    m = 8192 if cuda else 1024
    for dt in dtypes:
        # CPU bf16/fp16 GEMMs can be slow; a smaller cube is enough for a rate.
        m_dt = 512 if not cuda and dt.itemsize == 2 else m
        rates[str(dt).replace("torch.", "")] = _gemm_rate(device, dt, m_dt, m_dt, m_dt, 10 if cuda else 3)
    if cuda:
        torch.cuda.empty_cache()
    _DEVICE_CEILINGS[key] = DeviceCeiling(device=str(device), bandwidth=bandwidth, gemm_rate=rates)
    return _DEVICE_CEILINGS[key]


def case_gemms(case) -> Tuple[Tuple[int, int, int], ...]:
    """The base GEMMs (M, K, N) of a benchmark case: the densest GEMMs at its own shape
    (the adapter GEMMs share M and have smaller N, so they run no faster)."""
    if case.op == "mlp":
        return ((case.T, case.d_in, case.d_ff), (case.T, case.d_ff, case.d_in))
    if case.grad:  # dx = dy W0 has K and N swapped
        return ((case.T, case.d_in, case.d_out), (case.T, case.d_out, case.d_in))
    return ((case.T, case.d_in, case.d_out),)


def case_cost(case, work: str, elem_bytes: int, n_active: int) -> Optional[Dict[str, float]]:
    """Bytes and FLOPs of a case's op for a provider doing ``work`` ("full", "users":
    no experts, "base": the base linear alone); None for e2e (no cost model)."""
    if case.op == "e2e":
        return None
    K = case.K if work == "full" else 0
    r_u = case.r_u if work in ("full", "users") else 0
    if case.op == "mlp":
        return mlp_cost(case.T, case.d_in, case.d_ff, K=K, r=case.r, r_u=r_u, n_active=n_active,
                        elem_bytes=elem_bytes, backward=case.grad)
    return mixture_cost(case.T, case.d_in, case.d_out, K=K, r=case.r, r_u=r_u, n_active=n_active,
                        elem_bytes=elem_bytes, backward=case.grad)


class CaseCeilings:
    """The ceilings of each row's roofline: the best (:func:`best_of`) of the device-wide
    measurement and one at the row's own shape, i.e. the copy bandwidth with a working
    set of the row's bytes (the cache level the op runs from) and the GEMM rate of the
    case's base GEMMs (:func:`case_gemms`) in the run dtype. Each shape is measured once."""

    def __init__(self, device: torch.device, dtype: torch.dtype, device_ceiling: DeviceCeiling):
        self.device, self.dtype, self.device_ceiling = device, dtype, device_ceiling
        self._rates: Dict[tuple, float] = {}
        self._bandwidths: Dict[int, float] = {}

    def for_row(self, case, cost: Dict[str, float]) -> DeviceCeiling:
        reps = 10 if self.device.type == "cuda" else 5
        gemms = case_gemms(case)
        if gemms not in self._rates:
            self._rates[gemms] = max(_gemm_rate(self.device, self.dtype, M, K, N, reps) for M, K, N in gemms)
        nbytes = int(cost["bytes"])
        if nbytes not in self._bandwidths:
            self._bandwidths[nbytes] = _copy_bandwidth(self.device, nbytes, reps)
        own = DeviceCeiling(device=str(self.device), bandwidth=self._bandwidths[nbytes],
                            gemm_rate={str(self.dtype).replace("torch.", ""): self._rates[gemms]})
        return best_of(self.device_ceiling, own, self.dtype)


def best_of(a: DeviceCeiling, b: DeviceCeiling, dtype: torch.dtype) -> DeviceCeiling:
    """The higher bandwidth and ``dtype`` GEMM rate of two measurements. The roofline of a
    case uses the best of the device-wide and the case's own-shape ceilings: a shape that
    runs from cache gets its faster ceiling, and one where the library GEMM is weak (a
    decode GEMV) does not lower the ceiling below what the device does elsewhere."""
    name = str(dtype).replace("torch.", "")
    return DeviceCeiling(device=a.device, bandwidth=max(a.bandwidth, b.bandwidth),
                         gemm_rate={name: max(a.rate(dtype), b.rate(dtype))})
