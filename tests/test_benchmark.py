"""benchmarks/run.py end to end on CPU, its byte/flop model, and the popularity sampler."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from proper_kernels.testing import POPULARITY_LAWS, make_mixture_inputs, sample_user_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RUN = os.path.join(BENCH, "run.py")
sys.path.insert(0, BENCH)

import roofline  # noqa: E402


def _cli(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


# --------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("law", POPULARITY_LAWS)
@pytest.mark.parametrize("T,N", [(1, 1), (19, 4), (99, 16), (989, 64)])
def test_sampler_range_dtype_reproducible(law, T, N):
    ids = sample_user_ids(T, N, law, generator=torch.Generator().manual_seed(3))
    assert ids.dtype == torch.int64 and ids.shape == (T,)
    assert int(ids.min()) >= 0 and int(ids.max()) < N
    again = sample_user_ids(T, N, law, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, again)


def test_sampler_laws_shape_the_batch():
    g = torch.Generator().manual_seed(0)
    d = sample_user_ids(10, 4, "distinct", generator=g)
    assert d.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert sample_user_ids(8, 64, "distinct").unique().numel() == 8
    ident = sample_user_ids(50, 16, "identical", generator=g)
    assert ident.unique().numel() == 1
    sk = sample_user_ids(1001, 64, "skewed", generator=g)
    hot_count = sk.bincount().max().item()
    assert hot_count >= 501  # half of the tokens (rounded up) are one user, plus its uniform share
    z = sample_user_ids(20000, 64, "zipf", generator=g)
    counts = z.bincount(minlength=64).sort(descending=True).values.double()
    # Zipf(1.5): the top user holds 1/zeta_64(1.5) ~ 43% of the draws, rank 2 about 2^-1.5 of that.
    assert 0.38 < counts[0] / 20000 < 0.48
    assert 0.28 < counts[1] / counts[0] < 0.43
    u = sample_user_ids(20000, 8, "uniform", generator=g).bincount(minlength=8).double()
    assert (u / 20000 - 1 / 8).abs().max() < 0.02
    assert sample_user_ids(0, 5, "zipf").numel() == 0


def test_sampler_rejects_bad_law():
    with pytest.raises(ValueError, match="valid laws: distinct, uniform, zipf, identical, skewed"):
        sample_user_ids(4, 2, "pareto")


def test_make_mixture_inputs_runs_through_reference():
    from proper_kernels import lora_mixture

    inp = make_mixture_inputs(19, 24, 40, K=3, r=4, r_u=4, N=5, law="zipf")
    y = lora_mixture(**inp, backend="reference")
    assert y.shape == (19, 40) and torch.isfinite(y).all()


# --------------------------------------------------------------------------- byte/flop model
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


# --------------------------------------------------------------------------- CLI
def _rows(prefix):
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    with open(prefix + ".jsonl") as f:
        jrows = [json.loads(line) for line in f if line.strip()]
    return rows, jrows


def test_cli_cpu_small_end_to_end(tmp_path):
    prefix = str(tmp_path / "out" / "cpu-small")
    r = _cli("--preset", "cpu-small", "--device", "cpu", "--op", "fwd,fwdbwd,decode,mlp",
             "--providers", "base,reference,loop,torch,peft,triton,cuda", "--output", prefix + ".csv",
             "--no-progress", "--rep-ms", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "measured ceilings" in out and "median ms" in out
    assert "triton: needs CUDA" in out and "cuda: needs a CUDA device" in out
    rows, jrows = _rows(prefix)
    assert len(rows) == len(jrows) > 0
    assert set(rows[0]) >= {"op", "provider", "mode", "shape", "users", "median_ms", "p20_ms", "p80_ms", "tflops",
                            "gbps", "roofline_pct", "peak_mem_mb", "gpu", "torch", "triton", "git_commit"}
    ops = {r["op"] for r in rows}
    assert ops == {"fwd", "fwdbwd", "decode", "mlp"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"base", "reference", "loop", "torch", "peft"}
    for row in ok:
        assert row["refcheck"] == "pass"
        med, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert float(row["tflops"]) > 0 and float(row["gbps"]) > 0 and float(row["roofline_pct"]) > 0
    # Training: the fwdbwd rows checked gradients and PEFT is skipped with its reason.
    peft_train = [r for r in rows if r["provider"] == "peft" and r["mode"] == "train"]
    assert peft_train and all("inference-only" in r["status"] for r in peft_train)
    assert all(r["note"].startswith("PEFT") for r in rows if r["provider"] == "peft" and r["status"] == "ok")
    for row in jrows:
        assert row["torch"] == torch.__version__
    assert not any(r["status"].startswith(("error", "refcheck failed")) for r in rows), \
        [r["status"] for r in rows if r["status"].startswith(("error", "refcheck failed"))]


def test_cli_bf16_refcheck_grads(tmp_path):
    import run

    prefix = str(tmp_path / "bf16")
    rc = run.main(["--op", "fwdbwd", "--providers", "torch,loop,reference", "--dtype", "bfloat16",
                   "--popularity", "skewed", "--output", prefix, "--no-progress", "--rep-ms", "5", "--device", "cpu"])
    assert rc == 0
    rows, _ = _rows(prefix)
    assert {r["popularity"] for r in rows} == {"skewed"}
    assert all(r["status"] == "ok" and r["refcheck"] == "pass" and r["dtype"] == "bfloat16" for r in rows), rows


def test_cli_torch_compile_decode(tmp_path):
    import run

    prefix = str(tmp_path / "compile")
    rc = run.main(["--op", "decode", "--case", "4", "--providers", "torch-compile", "--dtype", "bfloat16",
                   "--output", prefix, "--no-progress", "--rep-ms", "5", "--device", "cpu"])
    assert rc == 0
    rows, _ = _rows(prefix)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["refcheck"] == "pass", rows


def test_cli_refcheck_catches_a_wrong_provider(monkeypatch, capsys):
    import providers
    import run

    class Wrong(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            fn = super().compose(case, layers, ids, plan)
            return lambda x: fn(x) * 1.01

    monkeypatch.setitem(providers.REGISTRY, "torch", Wrong())
    monkeypatch.setitem(run.REGISTRY, "torch", providers.REGISTRY["torch"])
    rc = run.main(["--op", "decode", "--case", "3", "--providers", "torch,reference", "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "refcheck failed: y: max err" in out


@pytest.mark.parametrize("argv,bad,valid", [
    (["--preset", "huge-9000"], "'huge-9000'", ("cpu-small", "square-4096", "llama-7b-mlp")),
    (["--providers", "torch,fastest"], "'fastest'", ("reference", "triton", "torch-compile")),
    (["--op", "fwdd"], "'fwdd'", ("fwdbwd", "decode", "e2e")),
    (["--popularity", "pareto"], "'pareto'", ("zipf", "skewed")),
    (["--dtype", "fp8"], "'fp8'", ("bfloat16",)),
    (["--case", "999", "--no-refcheck"], "--case 999", ("valid: 0..",)),
])
def test_cli_rejects_unknown_values(capsys, argv, bad, valid):
    import run

    rc = run.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert bad in err
    for v in valid:
        assert v in err


def test_cli_rejects_unknown_preset_subprocess():
    r = _cli("--preset", "huge-9000")
    assert r.returncode == 2
    assert "unknown preset 'huge-9000'; valid presets: cpu-small, square-4096, llama-7b-mlp, e2e" in r.stderr


def test_cli_list_and_ncu(capsys):
    import run

    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("cpu-small", "square-4096", "llama-7b-mlp", "e2e", "torch-compile", "peft", "zipf", "fwdbwd"):
        assert word in out
    assert run.main(["--ncu", "--preset", "square-4096", "--op", "fwd", "--providers", "triton", "--case", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ncu --nvtx") and 'proper_kernels::mixture_fwd/' in line
    assert "--case 1" in line and "--providers triton" in line and "--preset square-4096" in line


def test_cli_plot_without_matplotlib_fails_clearly(monkeypatch, capsys, tmp_path):
    import run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = run.main(["--op", "decode", "--case", "3", "--providers", "base", "--plot", str(tmp_path / "p.png"),
                   "--device", "cpu"])
    assert rc == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import run

    rc = run.main(["--op", "decode", "--case", "3", "--providers", "base,torch", "--plot", str(tmp_path / "p.png"),
                   "--no-progress", "--rep-ms", "5", "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_imports_without_optional_packages():
    # The CLI module imports neither triton, transformers nor peft at import time.
    code = ("import sys; sys.path[:0] = [%r, %r]; import run; "
            "bad = [m for m in ('triton', 'transformers', 'peft') if m in sys.modules]; "
            "print(bad); assert not bad" % (BENCH, ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- decode dispatch table
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
    import run

    # cuda wins at T=1 and 16; at T=64 it loses on one of two cases; wins again at 256.
    rows = _decode_rows({(1, 0): (0.010, 0.020), (16, 1): (0.011, 0.020), (64, 2): (0.015, 0.020),
                         (64, 3): (0.030, 0.020), (256, 4): (0.010, 0.050)})
    res = run.decode_crossover(rows)["bfloat16"]
    assert res["max_T"] == 16 and res["launch"] == "two"
    assert res["evidence_ms"]["64"] == [{"cuda": 0.015, "triton": 0.02}, {"cuda": 0.03, "triton": 0.02}]
    # with the single launch measured too: the faster mode counts per case, and the
    # mode with the lower total up to max_T is the table's launch
    rows = _decode_rows({(1, 0): (0.030, 0.010, 0.020), (16, 1): (0.011, 0.012, 0.020), (64, 2): (0.05, 0.05, 0.02)},
                        providers=("cuda", "cuda-one", "triton"))
    res = run.decode_crossover(rows)["bfloat16"]
    assert (res["max_T"], res["launch"]) == (16, "one")
    assert run.decode_crossover(_decode_rows({(1, 0): (0.03, 0.02)}))["bfloat16"]["max_T"] == 0
    assert run.decode_crossover(_decode_rows({(1, 0): (0.01, None)})) == {}


def test_decode_table_written_and_read(tmp_path, monkeypatch):
    import run
    from proper_kernels.ops import cuda_decode as cd

    path = tmp_path / "table.json"
    path.write_text(open(cd._TABLE_PATH).read())
    (default_T,) = [e["max_T"] for e in json.loads(path.read_text())["entries"] if e["arch"] == "default"]
    env = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", git_commit="abc", timestamp="2026-11-25T00:00:00")
    rows = _decode_rows({(1, 0): (0.010, 0.020), (16, 1): (0.011, 0.020), (64, 2): (0.012, 0.020), (256, 3): (0.1, 0.05)})
    entry = run.update_decode_table(str(path), rows, "sm_90", env, ["--op", "decode"])
    assert (entry["arch"], entry["dtype"], entry["max_T"], entry["measured"]) == ("sm_90", "bfloat16", 64, True)
    assert entry["launch"] == "two"
    assert "H100" in entry["source"] and "--op decode" in entry["source"]
    # a second run replaces the entry instead of adding one
    run.update_decode_table(str(path), rows[:2], "sm_90", env, [])
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
        run.update_decode_table(str(path), [], "sm_90", env, [])


def test_decode_table_rejects_a_bad_entry(tmp_path, monkeypatch):
    from proper_kernels.ops import cuda_decode as cd

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"entries": [{"arch": "default", "dtype": "*", "max_T": "16"}]}))
    monkeypatch.setattr(cd, "_TABLE_PATH", str(path))
    monkeypatch.setattr(cd, "_table_cache", None)
    monkeypatch.setattr(cd, "_table_index", None)
    with pytest.raises(ValueError, match="bad entry"):
        cd.decode_threshold()


def test_cli_decode_table_needs_both_providers(capsys):
    import run

    assert run.main(["--op", "decode", "--providers", "triton", "--decode-table", "x.json"]) == 2
    assert "include both" in capsys.readouterr().err


def test_gpu_session_script(tmp_path):
    """python/gpu_session.sh (run on a lent GPU only) parses, and an unknown stage
    prints its usage and exits 2 without touching anything."""
    script = os.path.join(ROOT, "python", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    r = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert r.returncode == 2
    assert "usage:" in r.stderr and "decode" in r.stderr and "all" in r.stderr
    text = open(script).read()
    assert "--decode-table proper_kernels/ops/decode_table.json" in text


def test_punica_laws_are_punicas_segments():
    """punica-uniform / punica-skewed are Punica's Uniform and Skewed workloads:
    contiguous segments of ceil(sqrt T) equal shares, and of floor(1.5^k) tokens
    (the remainder last), longest first, one distinct user each."""
    from proper_kernels.testing import punica_segments
    assert punica_segments(64, "punica-uniform") == [8] * 8
    assert punica_segments(7, "punica-uniform") == [3, 2, 2]
    assert punica_segments(64, "punica-skewed") == [17, 17, 11, 7, 5, 3, 2, 1, 1]
    assert punica_segments(1, "punica-skewed") == [1] and punica_segments(0, "punica-uniform") == []
    for T in (1, 2, 5, 16, 63, 64, 256, 1000):
        for law in ("punica-uniform", "punica-skewed"):
            lens = punica_segments(T, law)
            assert sum(lens) == T and min(lens) >= 1 and lens == sorted(lens, reverse=True)
    g = torch.Generator().manual_seed(3)
    ids = sample_user_ids(64, 64, "punica-skewed", generator=g)
    runs = torch.unique_consecutive(ids, return_counts=True)
    assert runs[1].tolist() == punica_segments(64, "punica-skewed")
    assert runs[0].unique().numel() == 9  # one user per segment
    ids = sample_user_ids(10, 2, "punica-uniform", generator=g)  # 4 segments, 2 users: reused
    assert ids.unique().numel() == 2 and torch.unique_consecutive(ids).numel() == 4
    with pytest.raises(ValueError, match="segment law"):
        punica_segments(8, "uniform")
