"""The byte/flop model of our ops and the device's measured ceilings.

``mixture_cost`` is the one place that says how many bytes an op must move and how
many FLOPs it must do (tests/test_benchmark_review.py checks it against the same
numbers worked by hand: square-4096 decode at T=64, 64 distinct users, 18.9 MB of
adapters); ``measure_device`` times a large copy and a large GEMM in this process, so a
measurement is reported against the machine it ran on, not a datasheet.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict

import torch

__all__ = ["mixture_cost", "mlp_cost", "DeviceCeiling", "measure_device", "roofline_ms"]


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


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps after one warmup."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_device(device: torch.device, dtypes=(torch.bfloat16, torch.float32)) -> DeviceCeiling:
    """Copy bandwidth (one large tensor copy: read + write) and the GEMM rate per dtype.

    On CUDA: a 1 GiB copy and 8192^3 GEMMs; on CPU: a 64 MiB copy and 1024^3 GEMMs
    (512^3 for 16-bit dtypes), so the measurement costs about a second on 2 cores.
    Measure the dtype the roofline will be asked about: ``DeviceCeiling.rate`` of an
    unmeasured dtype falls back to the fastest measured rate.
    """
    cuda = device.type == "cuda"
    n = (1 << 30) // 4 if cuda else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, 10 if cuda else 5)
    bandwidth = 2.0 * n * 4 / t
    del src, dst
    rates = {}
    m = 8192 if cuda else 1024
    for dt in dtypes:
        if not cuda and dt.itemsize == 2:
            m_dt = 512  # CPU bf16/fp16 GEMMs can be slow; a smaller cube is enough for a rate
        else:
            m_dt = m
        a = torch.randn(m_dt, m_dt, device=device).to(dt)
        b = torch.randn(m_dt, m_dt, device=device).to(dt)
        t = _time(lambda: a @ b, device, 10 if cuda else 3)
        rates[str(dt).replace("torch.", "")] = 2.0 * m_dt ** 3 / t
    if cuda:
        torch.cuda.empty_cache()
    return DeviceCeiling(device=str(device), bandwidth=bandwidth, gemm_rate=rates)
