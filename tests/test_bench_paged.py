"""benchmarks/paged.py: the paged user bank's rows (tokens/s of training and generation,
cache hit rate, bytes moved, device and host bytes) against the resident bank, its
Zipf batches, its sparse mapped bank, and its rows in benchmarks/run.py. Tiny sizes, CPU."""
import csv
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import paged  # noqa: E402
from presets import build_cases  # noqa: E402

CPU = torch.device("cpu")
SMALL = dict(cache=16, active=8, steps=2, warmup=1, T=4, new_tokens=2, r_u=4, device=CPU, dtype=torch.float32)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_preset_has_a_row_per_user_count_and_mode():
    cases = build_cases("paged", None, None)
    assert [(c.mode, c.N) for c in cases] == [(m, n) for m in paged.MODES for n in paged.USER_COUNTS]
    assert {(c.cache, c.active, c.law, c.r_u) for c in cases} == {(256, 64, "zipf", 8)}
    assert cases[0].shape() == "seq=16 users=64/64 C=256 r_u=8"


def test_zipf_batches_hold_distinct_users_and_favour_the_popular():
    batches = paged.zipf_batches(500, 32, 20, seed=3)
    assert all(b.numel() == b.unique().numel() == 32 and 0 <= int(b.min()) and int(b.max()) < 500 for b in batches)
    counts = torch.bincount(torch.cat(batches), minlength=500)
    assert int((counts > 0).sum()) < 400  # popular users come back: a cache has something to hit
    assert [b.numel() for b in paged.zipf_batches(5, 32, 2)] == [5, 5]  # fewer users than a batch: all of them


def test_rows_report_throughput_traffic_and_memory():
    small, large = (paged.run_rows(N, "train-step", limit_gb=1.0, **SMALL) for N in (40, 400))
    for rows in (small, large):
        assert [r["bank"] for r in rows] == ["paged", "resident"]
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
        p = rows[0]
        assert 0.0 <= p["hit_rate"] <= 1.0 and p["x_resident"] > 0 and rows[1]["x_resident"] == 1.0
        assert p["host_bytes"] > 0 and rows[1]["host_bytes"] == 0
    # the paged device part is C slots whatever N (C = min(16, N) = 16 for both); resident grows with N
    assert small[0]["device_bytes"] == large[0]["device_bytes"]
    assert large[1]["device_bytes"] > 5 * small[1]["device_bytes"]
    assert large[0]["bytes_per_batch"] > 0 and large[0]["hit_rate"] < 1.0  # 400 users do not fit 16 slots
    gen = paged.run_rows(400, "generate", limit_gb=1e-6, **SMALL)
    assert gen[0]["status"] == "ok" and gen[1]["status"].startswith("skipped:")  # resident over the limit
    table = paged.table(small + gen)
    assert "resident" in table and "skipped" in table and "hit" in table


def test_a_sparse_mapped_bank_writes_no_rows(tmp_path):
    rows = paged.run_rows(3000, "generate", limit_gb=1.0, mmap_dir=str(tmp_path), resident=False, **SMALL)
    assert rows[0]["status"] == "ok", rows
    path = tmp_path / "bank-3000" / "proper_adapter.safetensors"
    st = os.stat(path)
    assert st.st_size > 3000 * 1024 and st.st_blocks * 512 < st.st_size / 4  # a hole, not written zeros


def test_run_py_rows_of_the_paged_op(tmp_path):
    import run

    out = str(tmp_path / "paged")
    assert run.main(["--preset", "paged", "--case", "4", "--user-cache-size", "64", "--no-progress",
                     "--output", out]) == 0
    with open(out + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["paged", "resident"]
    assert all(r["op"] == "paged" and r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    assert "C=64" in rows[0]["note"] and "host" in rows[0]["note"]
