"""Review tests of benchmarks/run.py: the refcheck tolerance, the GPU timer's cache
state, the output files and the CLI's handling of bad values (all run on CPU)."""
import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def _patch_provider(monkeypatch, name, provider):
    import providers
    import run

    monkeypatch.setitem(providers.REGISTRY, name, provider)
    monkeypatch.setitem(run.REGISTRY, name, provider)


# --------------------------------------------------------------------------- refcheck
@pytest.mark.parametrize("case,drop", [(3, "experts"), (4, "user_router")])
def test_bf16_refcheck_catches_a_missing_term(monkeypatch, capsys, case, drop):
    """In bf16 a provider that leaves out the whole expert mixture (or the LoRA-aware
    router) must fail the check: the tolerance may not be a sizeable fraction of |y|."""
    import providers
    import run

    class Wrong(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            if drop == "experts":
                layers = [providers.strip_params(p, "users") for p in layers]
            else:
                layers = [dict(p, user_router=None) for p in layers]
            return super().compose(case, layers, ids, plan)

    _patch_provider(monkeypatch, "torch", Wrong())
    rc = run.main(["--op", "decode", "--case", str(case), "--providers", "torch", "--dtype", "bfloat16",
                   "--no-progress", "--rep-ms", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "refcheck failed: y: max err" in out


# --------------------------------------------------------------------------- GPU timer
def test_gpu_decode_graph_timing_flushes_l2(monkeypatch):
    """Decode cases timed under CUDA graphs must see a cold L2 like every do_bench row:
    one call captured in a graph, each replay timed by do_bench (which flushes L2
    before each call), not do_bench_cudagraph (back-to-back replays, no flush: W0 of
    a 4096x4096 projection stays in an H100's 50 MB L2 and the roofline % tops 100)."""
    pytest.importorskip("triton")
    import triton.testing as tt

    import run
    from presets import build_cases

    calls = []

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    def fake_do_bench(fn, warmup=25, rep=100, quantiles=None, **kw):
        calls.append(("do_bench", fn))
        fn()
        return [1.0, 0.9, 1.1]

    def no_graph_bench(*a, **k):
        raise AssertionError("do_bench_cudagraph does not flush L2 between calls")

    graph = FakeGraph()
    monkeypatch.setattr(run, "_capture_graph", lambda fn: graph, raising=False)
    monkeypatch.setattr(tt, "do_bench", fake_do_bench)
    monkeypatch.setattr(tt, "do_bench_cudagraph", no_graph_bench)
    case = [c for c in build_cases("cpu-small", ["decode"], None) if c.T == 16][0]
    med, p20, p80, timer = run.time_fn(lambda: None, torch.device("cuda"), case, 10.0, graph_safe=True)
    assert (med, p20, p80, timer) == (1.0, 0.9, 1.1, "cudagraph")
    assert calls[0][0] == "do_bench" and calls[0][1] == graph.replay and calls[1] == "replay"

    # capture fails (host syncs): plain do_bench of the step, timer "do_bench"
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(run, "_capture_graph", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    step = lambda: None  # noqa: E731
    calls.clear()
    assert run.time_fn(step, torch.device("cuda"), case, 10.0, graph_safe=True)[3] == "do_bench"
    assert calls[0] == ("do_bench", step)


# --------------------------------------------------------------------------- output files
def _strict_json(line):
    def bad(const):
        raise ValueError(f"not JSON: {const}")
    return json.loads(line, parse_constant=bad)


@pytest.mark.parametrize("wrong", ["nan", "shape"])
def test_jsonl_stays_valid_json_when_a_provider_fails(monkeypatch, tmp_path, wrong):
    """A provider returning NaNs or the wrong shape fails the check with a NaN error;
    the .jsonl must still be JSON (NaN is not), with null for the missing numbers."""
    import providers
    import run

    class Wrong(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            fn = super().compose(case, layers, ids, plan)
            if wrong == "nan":
                return lambda x: fn(x) * float("nan")
            return lambda x: fn(x)[:, :-1]

    _patch_provider(monkeypatch, "torch", Wrong())
    prefix = str(tmp_path / "r")
    assert run.main(["--op", "decode", "--case", "3", "--providers", "torch", "--output", prefix,
                     "--no-progress", "--device", "cpu"]) == 1
    rows = [_strict_json(line) for line in open(prefix + ".jsonl")]
    assert len(rows) == 1 and rows[0]["status"].startswith("refcheck failed")
    assert rows[0]["max_err"] is None or isinstance(rows[0]["max_err"], float)


def test_output_files_carry_the_command_line(tmp_path):
    import csv

    import run

    prefix = str(tmp_path / "cmd")
    argv = ["--op", "decode", "--case", "3", "--providers", "base", "--seed", "5", "--output", prefix,
            "--no-progress", "--rep-ms", "2", "--device", "cpu"]
    assert run.main(argv) == 0
    with open(prefix + ".csv") as f:
        row = next(csv.DictReader(f))
    jrow = _strict_json(open(prefix + ".jsonl").readline())
    for r in (row, jrow):
        assert r["command"].startswith("python benchmarks/run.py ") and "--case 3" in r["command"]
        assert "--seed 5" in r["command"]
    txt = open(prefix + ".txt").read()
    assert "command: python benchmarks/run.py --op decode --case 3" in txt


# --------------------------------------------------------------------------- CLI values
@pytest.mark.parametrize("argv,words", [
    (["--threads", "0"], ("--threads", "positive")),
    (["--threads", "-2"], ("--threads", "positive")),
    (["--iters", "0"], ("--iters", "positive")),
    (["--iters", "-1"], ("--iters", "positive")),
    (["--rep-ms", "0"], ("--rep-ms", "positive")),
    (["--rep-ms", "-5"], ("--rep-ms", "positive")),
    (["--rep-ms", "nan"], ("--rep-ms", "positive")),
    (["--device", "gpu"], ("--device", "'gpu'")),
    (["--providers", ","], ("--providers", "empty")),
    (["--op", ""], ("--op", "empty")),
    (["--popularity", " , "], ("--popularity", "empty")),
])
def test_cli_rejects_bad_values_naming_the_flag(capsys, argv, words):
    import run

    rc = run.main(argv + ["--case", "3", "--providers", "base"] if "--providers" not in argv else argv + ["--case", "3"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err


def test_cli_case_error_lists_the_valid_indices_of_the_selected_ops(capsys):
    """Case indices are numbered over all the preset's ops: with --op decode the valid
    ones of cpu-small are 3..4, not 0..1; with --op fwd,decode 0, 1, 3, 4."""
    import run

    assert run.main(["--op", "decode", "--case", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--case 0" in err and "valid: 3..4;" in err
    assert run.main(["--op", "fwd,decode", "--case", "2", "--device", "cpu"]) == 2
    assert "valid: 0, 1, 3, 4;" in capsys.readouterr().err


def test_cli_decode_table_refuses_on_cpu_before_running(monkeypatch, capsys):
    """Without CUDA --decode-table can never be written: refuse before timing anything."""
    import run

    ran = []
    monkeypatch.setattr(run, "run_case", lambda *a, **k: ran.append(1) or [])
    monkeypatch.setattr(run.roofline, "measure_device", lambda *a, **k: ran.append(1))
    rc = run.main(["--op", "decode", "--providers", "cuda,triton", "--decode-table", "t.json", "--device", "cpu"])
    assert rc == 2 and not ran
    assert "--decode-table needs a CUDA device" in capsys.readouterr().err


def test_cli_exit_status_counts_providers_that_raised(monkeypatch, capsys):
    """The summary counts an 'error:' row as failed; the exit status must agree."""
    import providers
    import run

    class Broken(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            def fn(x):
                raise RuntimeError("kernel launch failed")
            return fn

    _patch_provider(monkeypatch, "torch", Broken())
    rc = run.main(["--op", "decode", "--case", "3", "--providers", "base,torch", "--no-progress", "--rep-ms", "2",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert "error: RuntimeError: kernel launch failed" in out and "1 failed" in out
    assert rc == 1


def test_plot_shows_every_e2e_provider_as_tokens_per_s(monkeypatch, tmp_path):
    """e2e rows of provider 'proper' (not a kernel provider) were left out of the plot,
    and their median ms is not comparable (the loop times only some users): plot tok/s."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    import run

    seen = {}
    real_plot = matplotlib.axes.Axes.plot

    calls = []

    def spy(self, xs, ys, *a, **k):
        calls.append((self, k.get("label"), list(ys)))
        return real_plot(self, xs, ys, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    rows = [dict(op="e2e", status="ok", case=7, mode="train-step", T=8, popularity="distinct", provider=p,
                 median_ms=ms, tokens_per_s=tps) for p, ms, tps in (("proper", 70.0, 7000.0), ("loop", 90.0, 700.0))]
    rows.append(dict(op="decode", status="ok", case=3, mode="decode", T=1, popularity="uniform", provider="torch",
                     median_ms=0.1, tokens_per_s=""))
    run.plot(rows, str(tmp_path / "p.png"))
    for ax, label, ys in calls:  # titles are set after the series
        seen.setdefault(ax.get_title().split(":")[0], {})[label] = ys
    assert seen["e2e"] == {"proper": [7000.0], "loop": [700.0]}
    assert seen["decode"] == {"torch": [0.1]}


def test_ncu_lines_only_for_providers_that_run_the_case(capsys):
    """--ncu printed a command per requested provider even where that provider only
    skips (proper is e2e only, cuda decode only, peft forward only): ncu would profile nothing."""
    import run

    assert run.main(["--ncu", "--preset", "square-4096", "--op", "decode,fwdbwd"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    provs = {(l.split("--op ")[1].split()[0], l.split("--providers ")[1].split()[0]) for l in lines}
    assert ("decode", "cuda") in provs and ("decode", "triton") in provs and ("fwdbwd", "triton") in provs
    assert not {p for p in provs if p[1] == "proper"}
    assert ("fwdbwd", "cuda") not in provs and ("fwdbwd", "peft") not in provs


def test_e2e_prompts_hold_no_pad_token():
    """generate(pad_token_id=0) without an attention mask masks every token equal to 0
    (transformers infers the mask from the pad id): random prompts must avoid it."""
    import e2e
    from presets import build_cases

    why = e2e.integration_skip_reason()
    if why:
        pytest.skip(why)
    case = [c for c in build_cases("cpu-small", ["e2e"], None) if c.mode == "generate"][0]
    case.N = 64
    case.T = 64  # 64 x 64 tokens of a 256-token vocabulary: a 0 is all but certain without the fix
    _, _, ids, _, cfg = e2e.build(case, torch.device("cpu"), torch.float32)
    assert ids.shape == (64, 64) and int(ids.min()) >= 1 and int(ids.max()) < cfg["vocab_size"]


def test_roofline_uses_the_gemm_rate_of_the_run_dtype(capsys):
    """measure_device measured bf16 and fp32 only, so a float16 run took the fastest of
    those as its GEMM ceiling (on this CPU fp16 GEMMs are ~30x slower than bf16)."""
    import run

    assert run.main(["--op", "decode", "--case", "3", "--providers", "base", "--dtype", "float16",
                     "--no-progress", "--rep-ms", "2", "--device", "cpu"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("measured ceilings")][0]
    assert re.search(r"\bfloat16 [0-9.]+ TFLOP/s", line), line


# --------------------------------------------------------------------------- reported numbers
def test_square_4096_decode_rows_match_the_hand_arithmetic(tmp_path):
    """KERNELS.md section 12 by hand, plus what the op also moves (the base linear and the
    routers): square-4096 decode, T = 64, 64 distinct users, bf16.

    adapters: experts 8*16*(4096+4096) + W_r 8*4096 = 1,081,344 el; users 64 * (16*8192 +
    V 8*16 + c_u 8) = 8,397,312 el -> 2 B * 9,478,656 = 18,957,312 B (KERNELS: 18.9 MB);
    W0 + b 16,781,312 el; x + y 64*8192 el; ids 4 B * 64 -> 53,568,768 B.
    FLOPs: 2*64*144*8192 + 2*64*8*4096 + 2*64*128 + 2*64*4096^2 = 2,302,689,280.
    Every row's users column is the number of distinct ids of its batch."""
    import csv

    import run
    from presets import build_cases

    prefix = str(tmp_path / "sq")
    assert run.main(["--preset", "square-4096", "--op", "decode", "--providers", "base,torch", "--no-refcheck",
                     "--rep-ms", "1", "--no-progress", "--output", prefix]) == 0
    rows = list(csv.DictReader(open(prefix + ".csv")))
    cases = {c.index: c for c in build_cases("square-4096", ["decode"], None)}
    for r in rows:
        c = cases[int(r["case"])]
        _, _, ids, _, _ = run.make_layers(c, torch.bfloat16, torch.device("cpu"), 0)
        assert int(r["users"]) == ids.unique().numel(), r
        if r["provider"] == "torch" and c.T == 64 and c.law == "distinct":
            assert int(r["users"]) == 64
            assert float(r["bytes"]) == 53_568_768 and float(r["flops"]) == 2_302_689_280
        if r["provider"] == "torch" and c.law == "identical":
            assert int(r["users"]) == 1
        roof = float(r["roofline_ms"])
        assert float(r["roofline_pct"]) == pytest.approx(100 * roof / float(r["median_ms"]))
        assert float(r["gbps"]) == pytest.approx(float(r["bytes"]) / float(r["median_ms"]) / 1e6)


def test_iters_runs_e2e_untimed_too(capsys):
    """--iters N runs each case N times untimed (for nsys/ncu) instead of timing it; the
    e2e rows were timed regardless."""
    import e2e
    import run

    why = e2e.integration_skip_reason()
    if why:
        pytest.skip(why)
    assert run.main(["--op", "e2e", "--case", "7", "--providers", "proper", "--iters", "1", "--no-progress",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ran 1 untimed" in out and "tok/s" not in out


def test_plot_creates_its_folder(tmp_path):
    """--output creates its folder; --plot PATH crashed (after the whole run) on a new one."""
    pytest.importorskip("matplotlib")
    import run

    path = tmp_path / "new" / "dir" / "p.png"
    assert run.main(["--case", "3", "--providers", "base", "--plot", str(path), "--no-progress", "--rep-ms", "2",
                     "--device", "cpu"]) == 0
    assert path.stat().st_size > 0
