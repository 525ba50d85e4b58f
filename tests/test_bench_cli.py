"""benchmarks/run.py as a command line: one shared cpu-small run (its printed table,
files and exit status), the flags and their errors, --list/--ncu, --plot, --iters,
--decode-table's refusals, and python/gpu_session.sh that drives it on a GPU."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RUN = os.path.join(BENCH, "run.py")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


def _cli(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def _rows(prefix):
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    with open(prefix + ".jsonl") as f:
        jrows = [_strict_json(line) for line in f if line.strip()]
    return rows, jrows


def _strict_json(line):
    def bad(const):
        raise ValueError(f"not JSON: {const}")
    return json.loads(line, parse_constant=bad)


def _patch_provider(monkeypatch, name, provider):
    import providers

    monkeypatch.setitem(providers.REGISTRY, name, provider)


# --------------------------------------------------------------------------- one shared run
@pytest.fixture(scope="module")
def cpu_small(tmp_path_factory):
    """cpu-small's kernel ops with most providers, once for the tests below:
    (completed process, csv rows, jsonl rows, output prefix)."""
    prefix = str(tmp_path_factory.mktemp("cli") / "out" / "cpu-small")
    r = _cli("--preset", "cpu-small", "--device", "cpu", "--op", "fwd,fwdbwd,decode,mlp",
             "--providers", "base,reference,loop,torch,peft,triton,cuda", "--output", prefix + ".csv",
             "--no-progress", "--rep-ms", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    rows, jrows = _rows(prefix)
    return r, rows, jrows, prefix


def test_cli_cpu_small_end_to_end(cpu_small):
    r, rows, jrows, _ = cpu_small
    out = r.stdout
    assert "measured ceilings" in out and "median ms" in out
    assert "triton: needs CUDA" in out and "cuda: needs a CUDA device" in out
    assert len(rows) == len(jrows) > 0
    assert set(rows[0]) >= {"op", "provider", "mode", "shape", "users", "median_ms", "p20_ms", "p80_ms", "tflops",
                            "gbps", "roofline_pct", "peak_mem_mb", "gpu", "torch", "triton", "git_commit",
                            "x_base", "x_peer", "ceiling_gbps", "ceiling_tflops"}
    assert {r["op"] for r in rows} == {"fwd", "fwdbwd", "decode", "mlp"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"base", "reference", "loop", "torch", "peft"}
    for row in ok:
        assert row["refcheck"] == "pass"
        med, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert float(row["tflops"]) > 0 and float(row["gbps"]) > 0 and float(row["roofline_ms"]) > 0
        # %roof is printed only where the ceiling held (see run.ROOF_SLACK), and says why not otherwise.
        assert float(row["roofline_pct"]) > 0 if row["roofline_pct"] else "no roofline" in row["note"]
    # Training: the fwdbwd rows checked gradients and PEFT is skipped with its reason.
    peft_train = [r for r in rows if r["provider"] == "peft" and r["mode"] == "train"]
    assert peft_train and all("inference-only" in r["status"] for r in peft_train)
    assert all(r["note"].startswith("PEFT") for r in rows if r["provider"] == "peft" and r["status"] == "ok")
    for row in jrows:
        assert row["torch"] == torch.__version__
    assert not any(r["status"].startswith(("error", "refcheck failed")) for r in rows), \
        [r["status"] for r in rows if r["status"].startswith(("error", "refcheck failed"))]


def test_printed_output_fits_120_columns_without_warnings(cpu_small):
    r, _, _, prefix = cpu_small
    lines = r.stdout.splitlines() + open(prefix + ".txt").read().splitlines()
    # The command line and the written paths echo the caller's arguments; everything else fits.
    wide = [line for line in lines if len(line) > 120 and not line.startswith(("command: ", "wrote "))]
    assert not wide, wide
    # Warnings raised while the cases run are listed once after the table, none inside it.
    assert "Warning" not in r.stdout.split("skipped providers:")[0], r.stdout


def test_table_columns_and_ratios(cpu_small):
    """x base: time over the case's base linear; x peer: over the fastest other provider
    doing the whole op (peft and base do less, so they are nobody's peer)."""
    r, rows, _, _ = cpu_small
    head = [line for line in r.stdout.splitlines() if line.startswith("case ")][0]
    assert re.split(r"\s{2,}", head.strip()) == ["case", "T", "dims", "law", "provider", "median ms", "x base",
                                                 "x peer", "TFLOP/s", "GB/s", "%roof", "err/tol"]
    for case in {r["case"] for r in rows}:
        timed = {r["provider"]: r for r in rows if r["case"] == case and r["status"] == "ok"}
        base = float(timed["base"]["median_ms"])
        for prov, row in timed.items():
            assert float(row["x_base"]) == pytest.approx(float(row["median_ms"]) / base)
            peers = [float(p["median_ms"]) for q, p in timed.items() if q not in (prov, "base", "peft")]
            assert float(row["x_peer"]) == pytest.approx(float(row["median_ms"]) / min(peers))


def test_one_skip_line_per_provider(cpu_small):
    out = cpu_small[0].stdout
    block = out.split("skipped providers:\n")[1].split("\n\n")[0].splitlines()
    starts = [line.split(":")[0].strip() for line in block if not line.startswith("    ")]
    assert sorted(starts) == ["cuda", "peft", "triton"], block
    assert "  peft: mixed-batch adapter_names is inference-only (PEFT refuses it in training mode) (cases 2, 6)" in block
    assert "  cuda: needs a CUDA device (all cases)" in block


def test_rows_carry_the_cost_model_of_their_batch(cpu_small):
    """Every row's users column is the number of distinct ids of its batch, its bytes and
    FLOPs are the cost model's for that many users, and its rates follow from them."""
    from presets import build_cases
    from roofline import case_cost
    from steps import make_layers

    _, rows, _, _ = cpu_small
    cases = {c.index: c for c in build_cases("cpu-small", None, None)}
    users = {}
    for r in rows:
        c = cases[int(r["case"])]
        if c.index not in users:
            _, _, ids, _, _ = make_layers(c, torch.float32, torch.device("cpu"), 0)
            users[c.index] = ids.unique().numel()
        assert int(r["users"]) == users[c.index], r
        if r["status"] != "ok":
            continue
        work = {"base": "base", "peft": "users"}.get(r["provider"], "full")
        cost = case_cost(c, work, 4, users[c.index])
        assert float(r["bytes"]) == cost["bytes"] and float(r["flops"]) == cost["flops"]
        assert float(r["gbps"]) == pytest.approx(float(r["bytes"]) / float(r["median_ms"]) / 1e6)
        if r["roofline_pct"]:
            assert float(r["roofline_pct"]) == pytest.approx(100 * float(r["roofline_ms"]) / float(r["median_ms"]))
    assert users[1] == 1  # the identical law: one user


# --------------------------------------------------------------------------- flags
def test_cli_popularity_and_dtype_reach_the_rows(tmp_path):
    import run

    prefix = str(tmp_path / "bf16")
    rc = run.main(["--op", "decode", "--case", "3", "--providers", "base,torch", "--dtype", "bfloat16",
                   "--popularity", "skewed", "--output", prefix, "--no-progress", "--rep-ms", "2", "--device", "cpu"])
    assert rc == 0
    rows, _ = _rows(prefix)
    assert {r["popularity"] for r in rows} == {"skewed"}
    assert all(r["status"] == "ok" and r["refcheck"] == "pass" and r["dtype"] == "bfloat16" for r in rows), rows


def test_cli_refcheck_catches_a_wrong_provider(monkeypatch, capsys):
    import providers
    import run

    class Wrong(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            fn = super().compose(case, layers, ids, plan)
            return lambda x: fn(x) * 1.01

    _patch_provider(monkeypatch, "torch", Wrong())
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
    assert run.main(["--op", "decode", "--case", "3,x", "--device", "cpu"]) == 2
    assert "comma list of case indices" in capsys.readouterr().err


def test_cli_case_takes_a_comma_list(capsys):
    """--case 3,4 runs exactly those cases (the GPU session picks its decode T this way)."""
    import run

    assert run.main(["--op", "decode", "--case", "3,4", "--providers", "base", "--no-refcheck", "--no-progress",
                     "--device", "cpu", "--rep-ms", "5"]) == 0
    out = capsys.readouterr().out
    assert "3 rows" not in out and "2 rows" in out


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


def test_ncu_lines_only_for_providers_that_run_the_case(capsys):
    """--ncu prints a command only where the provider computes the case's op (proper is
    e2e only, cuda decode only, peft forward only): ncu would profile nothing."""
    import run

    assert run.main(["--ncu", "--preset", "square-4096", "--op", "decode,fwdbwd"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    provs = {(l.split("--op ")[1].split()[0], l.split("--providers ")[1].split()[0]) for l in lines}
    assert ("decode", "cuda") in provs and ("decode", "triton") in provs and ("fwdbwd", "triton") in provs
    assert not {p for p in provs if p[1] == "proper"}
    assert ("fwdbwd", "cuda") not in provs and ("fwdbwd", "peft") not in provs


def test_cli_imports_without_optional_packages():
    # The CLI module imports neither triton, transformers nor peft at import time.
    code = ("import sys; sys.path[:0] = [%r, %r]; import run; "
            "bad = [m for m in ('triton', 'transformers', 'peft') if m in sys.modules]; "
            "print(bad); assert not bad" % (BENCH, ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_roofline_uses_the_gemm_rate_of_the_run_dtype(capsys):
    """The device ceiling is measured in the run's dtype (a float16 run must not take
    the bf16 or fp32 rate: on this CPU fp16 GEMMs are ~30x slower than bf16)."""
    import run

    assert run.main(["--op", "decode", "--case", "3", "--providers", "base", "--dtype", "float16",
                     "--no-progress", "--rep-ms", "2", "--device", "cpu"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("measured ceilings")][0]
    assert re.search(r"\bfloat16 [0-9.]+ TFLOP/s", line), line


# --------------------------------------------------------------------------- failures and files
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


def test_cli_plot_without_matplotlib_fails_clearly(monkeypatch, capsys, tmp_path):
    import run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = run.main(["--op", "decode", "--case", "3", "--providers", "base", "--plot", str(tmp_path / "p.png"),
                   "--device", "cpu"])
    assert rc == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_cli_plot_creates_its_folder(tmp_path):
    """--plot PATH writes the PNG, creating PATH's folder (--output does too)."""
    pytest.importorskip("matplotlib")
    import run

    path = tmp_path / "new" / "dir" / "p.png"
    assert run.main(["--op", "decode", "--case", "3", "--providers", "base,torch", "--plot", str(path),
                     "--no-progress", "--rep-ms", "2", "--device", "cpu"]) == 0
    assert path.stat().st_size > 0


def test_iters_runs_e2e_untimed_too(capsys, tmp_path):
    """--iters N runs each case N times untimed (for nsys/ncu) instead of timing it, e2e too."""
    import e2e
    import run

    why = e2e.integration_skip_reason()
    if why:
        pytest.skip(why)
    prefix = str(tmp_path / "iters")
    assert run.main(["--op", "e2e", "--case", "7", "--providers", "proper", "--iters", "1", "--no-progress",
                     "--device", "cpu", "--output", prefix]) == 0
    assert re.search(r"proper\s+ran 1 untimed$", capsys.readouterr().out, re.M)
    (row,), _ = _rows(prefix)
    assert row["status"] == "ran 1 untimed" and row["tokens_per_s"] == "" and row["median_ms"] == ""


# --------------------------------------------------------------------------- --decode-table
def test_cli_decode_table_needs_both_providers(capsys):
    import run

    assert run.main(["--op", "decode", "--providers", "triton", "--decode-table", "x.json"]) == 2
    assert "include both" in capsys.readouterr().err


def test_cli_decode_table_refuses_on_cpu_before_running(monkeypatch, capsys):
    """Without CUDA --decode-table can never be written: refuse before timing anything."""
    import run

    ran = []
    monkeypatch.setattr(run, "run_case", lambda *a, **k: ran.append(1) or [])
    monkeypatch.setattr(run.roofline, "measure_device", lambda *a, **k: ran.append(1))
    rc = run.main(["--op", "decode", "--providers", "cuda,triton", "--decode-table", "t.json", "--device", "cpu"])
    assert rc == 2 and not ran
    assert "--decode-table needs a CUDA device" in capsys.readouterr().err


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


def test_gpu_session_all_fits_its_budget_and_runs_the_asked_cases():
    """`gpu_session.sh all` is one device call of at most 8 minutes: the timeouts of its
    parts add up to <= 480 s; its cases are decode T in {1, 16, 64} and fwd / fwdbwd at
    T = 8192 of square-4096; every kernel test file it names exists."""
    import re

    from presets import build_cases

    text = open(os.path.join(ROOT, "python", "gpu_session.sh")).read()
    block = text[text.index("    all)"):text.index(";;", text.index("    all)"))]
    budgets = [int(m) for m in re.findall(r"^\s*(?:all\)\s*)?(?:install|decode|kernel_tests|bench) (\d+)", block, re.M)]
    assert len(budgets) == 5 and sum(budgets) <= 480, budgets
    cases = {c.index: c for c in build_cases("square-4096", None, None, "cuda")}
    decode_idx, prefill_idx = [[int(i) for i in m.split(",")] for m in re.findall(r"--case ([\d,]+)", block)]
    assert {cases[i].T for i in decode_idx} == {1, 16, 64} and {cases[i].op for i in decode_idx} == {"decode"}
    assert {(cases[i].op, cases[i].T) for i in prefill_idx} == {("fwd", 8192), ("fwdbwd", 8192)}
    more = text[text.index("    more)"):text.index(";;", text.index("    more)"))]
    # the second call: its parts after the install `all` already did fit one 10-minute call
    assert sum(int(v) for v in re.findall(r"(?:decode|bench|timeout) (\d+)", more)) <= 560, more
    assert "--preset paged" in more and "--preset llama-7b-mlp" in more
    files = re.search(r'KERNEL_TESTS="([^"]+)"', text).group(1).replace("\\\n", " ").split()
    assert files and all(os.path.exists(os.path.join(ROOT, f)) for f in files), files
