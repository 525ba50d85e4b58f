"""benchmarks/roofline.py: the byte/flop model of the ops (checked against numbers
worked by hand) and the ceilings each row's roofline uses."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import roofline  # noqa: E402
from presets import build_cases  # noqa: E402

CPU = torch.device("cpu")


def test_cost_model_matches_kernels_md_section_12():
    # KERNELS.md 12: 4096 -> 4096, K=8, r=16, r_u=16, 64 distinct users, bf16, T=64 decode,
    # no base: ~18.9 MB of adapters (plus the routers), 0.151 GFLOP.
    c = roofline.mixture_cost(64, 4096, 4096, K=8, r=16, r_u=16, n_active=64, elem_bytes=2,
                              include_base=False, router=False, user_router=False)
    assert abs(c["flops"] - 4 * 4096 * 144 * 64) < 1
    # adapters: (8 + 64) rank-16 pairs of 2*4096*16 elements, 2 B each, + c_u (64 x 8)
    assert c["adapter_bytes"] == 2 * (72 * 16 * 8192 + 64 * 8)
    assert 18.8e6 < c["adapter_bytes"] < 19.0e6
    act = 2 * 64 * 8192
    assert c["bytes"] == c["adapter_bytes"] + act + 4 * 64
    # Prefill T = 8192, write-only output: 19.3 GFLOP, ~153 MB.
    p = roofline.mixture_cost(8192, 4096, 4096, K=8, r=16, r_u=16, n_active=64, elem_bytes=2,
                              include_base=False, router=False, user_router=False)
    assert abs(p["flops"] / 1e9 - 19.3) < 0.05
    assert abs(p["bytes"] / 1e6 - 153.2) < 0.5


def test_cost_model_terms():
    kw = dict(K=4, r=8, r_u=8, n_active=3, elem_bytes=4)
    base = roofline.mixture_cost(10, 32, 48, **kw, include_base=True)
    nobase = roofline.mixture_cost(10, 32, 48, **kw, include_base=False)
    assert base["flops"] - nobase["flops"] == 2 * 10 * 32 * 48
    assert base["bytes"] - nobase["bytes"] == 4 * (32 * 48 + 48)
    full = roofline.mixture_cost(10, 32, 48, **kw, include_base=False)
    no_router = roofline.mixture_cost(10, 32, 48, **kw, include_base=False, router=False, user_router=False)
    assert full["flops"] - no_router["flops"] == 2 * 10 * 4 * 32 + 2 * 10 * 4 * 8
    bwd = roofline.mixture_cost(10, 32, 48, **kw, include_base=True, backward=True)
    adapter_flops = nobase["flops"]
    assert bwd["flops"] == base["flops"] + 2 * adapter_flops + 2 * 10 * 32 * 48
    assert bwd["bytes"] > base["bytes"]
    more_users = roofline.mixture_cost(10, 32, 48, K=4, r=8, r_u=8, n_active=5, elem_bytes=4)
    assert more_users["bytes"] - base["bytes"] == 4 * 2 * (8 * 80 + 4 * 8 + 4)
    ceil = roofline.DeviceCeiling("cpu", bandwidth=1e9, gemm_rate={"float32": 1e9})
    assert roofline.roofline_ms({"bytes": 2e6, "flops": 1e6}, ceil, torch.float32) == pytest.approx(2.0)
    assert roofline.roofline_ms({"bytes": 1e6, "flops": 3e6}, ceil, torch.float32) == pytest.approx(3.0)
    m = roofline.mlp_cost(4, 16, 40, K=2, r=4, r_u=4, n_active=2, elem_bytes=2)
    parts = (2 * roofline.mixture_cost(4, 16, 40, K=2, r=4, r_u=4, n_active=2, elem_bytes=2)["flops"]
             + roofline.mixture_cost(4, 40, 16, K=2, r=4, r_u=4, n_active=2, elem_bytes=2)["flops"])
    assert m["flops"] == parts + 5 * 4 * 40


def test_square_4096_decode_rows_match_the_hand_arithmetic():
    """KERNELS.md section 12 by hand, plus what the op also moves (the base linear and the
    routers): square-4096 decode, T = 64, 64 distinct users, bf16.

    adapters: experts 8*16*(4096+4096) + W_r 8*4096 = 1,081,344 el; users 64 * (16*8192 +
    V 8*16 + c_u 8) = 8,397,312 el -> 2 B * 9,478,656 = 18,957,312 B (KERNELS: 18.9 MB);
    W0 + b 16,781,312 el; x + y 64*8192 el; ids 4 B * 64 -> 53,568,768 B.
    FLOPs: 2*64*144*8192 + 2*64*8*4096 + 2*64*128 + 2*64*4096^2 = 2,302,689,280.
    The users of a row are its batch's distinct ids (the routing plan's active users)."""
    from steps import make_layers

    cases = build_cases("square-4096", ["decode"], None)
    (distinct,) = [c for c in cases if c.T == 64 and c.law == "distinct"]
    (identical,) = [c for c in cases if c.law == "identical"]
    users = {}
    for c in (distinct, identical):
        _, _, ids, pl, _ = make_layers(c, torch.bfloat16, CPU, 0)
        users[c.law] = int(pl.active_users.numel())
        assert users[c.law] == ids.unique().numel()
    assert users == {"distinct": 64, "identical": 1}
    cost = roofline.case_cost(distinct, "full", 2, users["distinct"])
    assert cost["bytes"] == 53_568_768 and cost["flops"] == 2_302_689_280
    assert cost["adapter_bytes"] == 18_957_312
    # base rows: the base linear alone; peft rows: no experts, no routers
    base = roofline.case_cost(distinct, "base", 2, 64)
    assert base["flops"] == 2 * 64 * 4096 ** 2 and base["bytes"] == 2 * (16_781_312 + 64 * 8192) + 4 * 64
    peft = roofline.case_cost(distinct, "users", 2, 64)
    assert peft["flops"] == 2 * 64 * 16 * 8192 + 2 * 64 * 4096 ** 2
    assert roofline.case_cost(build_cases("cpu-small", ["e2e"], None)[0], "full", 4, 64) is None


def test_case_gemms_are_the_base_gemms_at_the_case_shape():
    by_op = {}
    for c in build_cases("llama-7b-mlp", None, None):  # the first case of each op: 4096 -> 11008
        by_op.setdefault(c.op + ("-train" if c.grad else ""), c)
    assert roofline.case_gemms(by_op["decode"]) == ((by_op["decode"].T, 4096, 11008),)
    assert roofline.case_gemms(by_op["fwdbwd-train"]) == ((1024, 4096, 11008), (1024, 11008, 4096))
    assert roofline.case_gemms(by_op["mlp"]) == ((by_op["mlp"].T, 4096, 11008), (by_op["mlp"].T, 11008, 4096))


def test_each_row_takes_the_best_of_the_device_and_its_own_shape(monkeypatch):
    """A small shape that runs from cache gets its own, faster ceiling (so the base
    linear is not 'faster than its roofline'); a shape where the library GEMM is slow
    keeps the device's. Each shape is measured once."""
    measured = []
    monkeypatch.setattr(roofline, "_gemm_rate", lambda dev, dt, M, K, N, reps: measured.append((M, K, N)) or 1e9 * M)
    monkeypatch.setattr(roofline, "_copy_bandwidth", lambda dev, nbytes, reps: measured.append(nbytes) or 5e9)
    device_wide = roofline.DeviceCeiling("cpu", bandwidth=8e9, gemm_rate={"float32": 40e9, "bfloat16": 1e12})
    ceilings = roofline.CaseCeilings(CPU, torch.float32, device_wide)
    small = [c for c in build_cases("cpu-small", ["fwd"], None) if c.T == 64][0]
    cost = roofline.case_cost(small, "full", 4, 16)
    got = ceilings.for_row(small, cost)
    assert got.bandwidth == 8e9  # the device's copy beat this shape's
    assert got.rate(torch.float32) == 64e9  # this shape's GEMM beat the device's
    assert ceilings.for_row(small, cost) == got
    assert measured == [(64, 256, 320), int(cost["bytes"])]
    slow = roofline.DeviceCeiling("cpu", bandwidth=1e9, gemm_rate={"float32": 1e15})
    assert roofline.best_of(slow, got, torch.float32).rate(torch.float32) == 1e15


def test_measure_device_measures_the_asked_dtypes_once():
    a = roofline.measure_device(CPU, dtypes=(torch.float32,))
    assert set(a.gemm_rate) == {"float32"} and a.bandwidth > 0 and a.gemm_rate["float32"] > 0
    assert roofline.measure_device(CPU, dtypes=(torch.float32,)) is a
    own = roofline.CaseCeilings(CPU, torch.float32, a).for_row(
        build_cases("cpu-small", ["decode"], None)[0], {"bytes": 1e5, "flops": 1e5})
    assert own.bandwidth >= a.bandwidth and own.rate(torch.float32) >= a.rate(torch.float32)
