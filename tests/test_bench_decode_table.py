"""benchmarks/decode_table.py: the CUDA decode kernel's dispatch table from a run's
decode rows, written where ``lora_mixture(backend="auto")`` reads it."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _decode_rows(times, providers=("cuda", "triton")):
    """Rows as run.py makes them: times = {(T, case): (ms of each provider)}."""
    rows = []
    for (T, case), pair in times.items():
        for prov, ms in zip(providers, pair):
            rows.append(dict(op="decode", status="ok" if ms is not None else "skipped: x", provider=prov,
                             dtype="bfloat16", T=T, case=case, median_ms=ms))
    rows.append(dict(op="fwd", status="ok", provider="cuda", dtype="bfloat16", T=1, case=99, median_ms=0.0))
    return rows


def test_decode_crossover_needs_a_win_at_every_case_up_to_T():
    import decode_table

    # cuda wins at T=1 and 16; at T=64 it loses on one of two cases; wins again at 256.
    rows = _decode_rows({(1, 0): (0.010, 0.020), (16, 1): (0.011, 0.020), (64, 2): (0.015, 0.020),
                         (64, 3): (0.030, 0.020), (256, 4): (0.010, 0.050)})
    res = decode_table.decode_crossover(rows)["bfloat16"]
    assert res["max_T"] == 16 and res["launch"] == "two"
    assert res["evidence_ms"]["64"] == [{"cuda": 0.015, "triton": 0.02}, {"cuda": 0.03, "triton": 0.02}]
    # with the single launch measured too: the faster mode counts per case, and the
    # mode with the lower total up to max_T is the table's launch
    rows = _decode_rows({(1, 0): (0.030, 0.010, 0.020), (16, 1): (0.011, 0.012, 0.020), (64, 2): (0.05, 0.05, 0.02)},
                        providers=("cuda", "cuda-one", "triton"))
    res = decode_table.decode_crossover(rows)["bfloat16"]
    assert (res["max_T"], res["launch"]) == (16, "one")
    assert decode_table.decode_crossover(_decode_rows({(1, 0): (0.03, 0.02)}))["bfloat16"]["max_T"] == 0
    assert decode_table.decode_crossover(_decode_rows({(1, 0): (0.01, None)})) == {}


def test_decode_table_written_and_read(tmp_path, monkeypatch):
    import decode_table
    from proper_kernels.ops import cuda_decode as cd

    path = tmp_path / "table.json"
    path.write_text(open(cd._TABLE_PATH).read())
    (default_T,) = [e["max_T"] for e in json.loads(path.read_text())["entries"] if e["arch"] == "default"]
    env = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", git_commit="abc", timestamp="2026-11-25T00:00:00")
    rows = _decode_rows({(1, 0): (0.010, 0.020), (16, 1): (0.011, 0.020), (64, 2): (0.012, 0.020), (256, 3): (0.1, 0.05)})
    entry = decode_table.update_decode_table(str(path), rows, "sm_90", env, ["--op", "decode"])
    assert (entry["arch"], entry["dtype"], entry["max_T"], entry["measured"]) == ("sm_90", "bfloat16", 64, True)
    assert entry["launch"] == "two"
    assert "H100" in entry["source"] and "--op decode" in entry["source"]
    # a second run replaces the entry instead of adding one
    decode_table.update_decode_table(str(path), rows[:2], "sm_90", env, [])
    table = json.loads(path.read_text())
    assert [(e["arch"], e["dtype"], e["max_T"]) for e in table["entries"]] == [("default", "*", default_T), ("sm_90", "bfloat16", 1)]
    assert table["about"].startswith("When lora_mixture")

    # the package reads it: (arch, dtype) first, then the defaults
    monkeypatch.setattr(cd, "_TABLE_PATH", str(path))
    monkeypatch.setattr(cd, "_table_cache", None)
    monkeypatch.setattr(cd, "_table_index", None)
    monkeypatch.setattr(cd, "_arch_of", lambda device: "sm_90" if device == "fake-h100" else "default")
    monkeypatch.delenv("PROPER_KERNELS_CUDA_DECODE_MAX_T", raising=False)
    assert cd.decode_threshold("fake-h100", torch.bfloat16) == 1
    assert cd.decode_threshold("fake-h100", torch.float16) == default_T  # sm_90 has no fp16 entry
    assert cd.decode_threshold("cpu", torch.bfloat16) == default_T
    monkeypatch.setenv("PROPER_KERNELS_CUDA_DECODE_MAX_T", "40")
    assert cd.decode_threshold("fake-h100", torch.bfloat16) == 40
    # the launch mode comes from the same table
    table = json.loads(path.read_text())
    table["entries"][-1]["launch"] = "one"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(cd, "_table_cache", None)
    monkeypatch.setattr(cd, "_table_index", None)
    monkeypatch.delenv("PROPER_KERNELS_CUDA_DECODE_LAUNCH", raising=False)
    assert cd.launch_mode(None, "fake-h100", torch.bfloat16) == "one"
    assert cd.launch_mode(None, "fake-h100", torch.float16) == "two"
    assert cd.launch_mode("two", "fake-h100", torch.bfloat16) == "two"
    with pytest.raises(ValueError, match="no decode case has timed rows of both providers"):
        decode_table.update_decode_table(str(path), [], "sm_90", env, [])


def test_decode_table_rejects_a_bad_entry(tmp_path, monkeypatch):
    from proper_kernels.ops import cuda_decode as cd

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"entries": [{"arch": "default", "dtype": "*", "max_T": "16"}]}))
    monkeypatch.setattr(cd, "_TABLE_PATH", str(path))
    monkeypatch.setattr(cd, "_table_cache", None)
    monkeypatch.setattr(cd, "_table_index", None)
    with pytest.raises(ValueError, match="bad entry"):
        cd.decode_threshold()
