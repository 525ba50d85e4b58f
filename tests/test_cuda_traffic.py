"""Global-memory traffic of the CUDA decode kernel, counted by the CPU emulation (its
vector loads: weights and activations, requested and unique bytes), and the script
that reports it, python/emu_traffic.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from proper_kernels.testing import DecodeRunner, make_decode_case, repo_root

ROOT = repo_root()


@pytest.mark.parametrize("case", [
    dict(T=1), dict(T=8), dict(T=9, users="with_none"), dict(T=64, users="identical"),
    dict(T=5, d_in=111, d_out=99, r=3, r_u=5), dict(T=3, router=False, user_router=False),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_emulated_weight_traffic(emu, case):
    """Counted in the emulation (python/emu_traffic.py): the kernel's vector loads touch
    exactly the weight bytes the formula needs (every expert/router row, the A/B rows
    of each user present, nothing else), both launch modes load the same, and a single
    token loads every weight byte exactly once."""
    kw_case = dict(dict(d_in=256, d_out=96, K=4, r=8, N=5, r_u=8, dtype=torch.bfloat16), **case)
    x, W, b, kw = make_decode_case(**kw_case)
    traffic = {}
    for launch in ("two", "one"):
        emu.configure(sms=8)
        emu.launches(clear=True)
        DecodeRunner("emulated", launch, emu)(x, W, b, **kw)
        log = emu.launches(clear=True)
        traffic[launch] = {k: sum(e[k] for e in log) for k in ("weight_bytes", "weight_bytes_unique", "act_bytes_unique")}
    emu.configure()
    K, r, r_u, d_in, d_out = kw_case["K"], kw_case["r"], kw_case["r_u"], kw_case["d_in"], kw_case["d_out"]
    users = int((kw["user_ids"].unique() >= 0).sum())
    rows_in = K * r + (K if kw.get("router_weight") is not None else 0) + users * r_u
    model = 2 * (rows_in * d_in + (K * r + users * r_u) * d_out)
    assert traffic["two"] == traffic["one"]
    assert traffic["two"]["weight_bytes_unique"] == model
    assert traffic["two"]["act_bytes_unique"] == 2 * x.numel()  # every x element, once at least
    if case["T"] == 1:
        assert traffic["two"]["weight_bytes"] == model


def test_emu_traffic_cli(emu):
    """python/emu_traffic.py prints one row per T and launch mode; the unique weight
    bytes equal the model's, and a single token re-reads nothing."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", "emu_traffic.py"), "--T", "1", "9",
                           "--d-in", "64", "--d-out", "32", "--K", "2", "--r", "4", "--r-u", "4", "--N", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "two"), ("1", "one"), ("9", "two"), ("9", "one")]
    for row in rows:
        assert row[3] == row[4]  # unique weight MB == the model's
    assert rows[0][6] == "1.00"  # one token: every weight byte loaded once
