"""benchmarks/report.py: the printed table (120 columns, ratios, e2e as tokens/s), the
skip lines, the CSV/JSONL/TXT files and the plot, on rows made here."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import report  # noqa: E402
from presets import build_cases  # noqa: E402


def _row(case, provider, ms=None, status="ok", **kw):
    """A row as run.py makes it, for a presets.Case."""
    base = dict(case=case.index, op=case.op, mode=case.mode, shape=case.shape(), T=case.T, d_in=case.d_in,
                d_out=case.d_out, d_ff=case.d_ff, K=case.K, r=case.r, r_u=case.r_u, N=case.N,
                popularity=case.law, dtype="bfloat16", new_tokens=case.new_tokens)
    row = report.new_row(base, provider=provider, status=status, **kw)
    if ms is not None:
        row.update(median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, refcheck="pass", max_err=0.01, tol=0.04,
                   tflops=123.456, gbps=3350.5, roofline_pct=87.65)
    return row


def _widest_rows():
    """Rows of the widest presets: 4-digit T, 11008-wide dims, long laws and providers,
    a failed check, an error, e2e with notes; and a skipped provider."""
    rows = []
    for k, preset in enumerate(("square-4096", "llama-7b-mlp")):
        for c in build_cases(preset, None, ["punica-uniform"], "cuda"):
            c.index += 100 * k  # one run has one preset: keep the two presets' cases apart
            for i, p in enumerate(report.PROVIDERS):
                rows.append(_row(c, p, ms=0.0123 * (i + 1) * c.T))
            rows.append(_row(c, "triton", status="refcheck failed: dexpert_B[gate]: max err 0.123 > tol 0.0456"))
            rows.append(_row(c, "cuda", status="error: RuntimeError: CUDA error: an illegal memory access was "
                                               "encountered (compile with TORCH_USE_CUDA_DSA to enable device-side)"))
            rows.append(_row(c, "cuda-one", status="skipped: cuda-one: decode kernel, only --op decode"))
    for c in build_cases("e2e", None, None, "cuda"):
        for p, tps in (("proper", 12345.6), ("loop", 1234.5), ("peft", 2345.6)):
            rows.append(_row(c, p, ms=0.5, tokens_per_s=tps, refcheck="n/a",
                             note="one user at a time (grad accumulation); 16 of 64 users timed"))
    return rows


def test_table_fits_120_columns_on_the_widest_presets():
    rows = _widest_rows()
    report.add_ratios(rows)
    table = report.summary_table(rows)
    lines = table.splitlines() + report.legend(rows) + report.skip_lines(rows)
    assert max(len(l) for l in lines) <= 120, [l for l in lines if len(l) > 120]
    assert "refcheck failed: dexpert_B[gate]" in table and "error: RuntimeError: CUDA error" in table
    assert any(l.endswith("...") and "CUDA error: an illegal" in l for l in lines)  # cut: the CSV has it all
    assert "skipped" not in table  # skips are listed under the table, once per provider
    # every case's line group starts with its T, dims and law; later lines leave them blank
    assert "4096->11008->4096" in table and "punica-uniform" in table


def test_e2e_rows_give_tokens_per_s_only():
    """e2e steps of different batch shapes (N users at once vs a few one at a time) do
    not compare in ms: their section shows tokens/s and the peer ratio of tokens/s."""
    case = build_cases("cpu-small", ["e2e"], None)[0]
    rows = [_row(case, "proper", ms=70.0, tokens_per_s=7000.0, refcheck="n/a"),
            _row(case, "loop", ms=90.0, tokens_per_s=700.0, refcheck="n/a")]
    report.add_ratios(rows)
    assert rows[0]["x_peer"] == pytest.approx(0.1) and rows[1]["x_peer"] == pytest.approx(10.0)
    assert rows[0]["x_base"] == ""
    table = report.summary_table(rows)
    assert "tok/s" in table and "median ms" not in table
    assert report.fmt(70.0, 4) not in table and report.fmt(90.0, 4) not in table
    assert "7,000" in table and "700" in table


def test_ratios_over_base_and_the_fastest_full_peer():
    case = build_cases("cpu-small", ["decode"], None)[0]
    rows = [_row(case, "base", ms=1.0), _row(case, "torch", ms=4.0), _row(case, "loop", ms=8.0),
            _row(case, "peft", ms=2.0), _row(case, "reference", status="refcheck failed: y: max err 1 > tol 0.1")]
    report.add_ratios(rows)
    got = {r["provider"]: (r["x_base"], r["x_peer"]) for r in rows}
    assert got["base"] == (1.0, 0.25)
    assert got["torch"] == (4.0, 0.5)   # the fastest of the whole op: x peer < 1
    assert got["loop"] == (8.0, 2.0)
    assert got["peft"] == (2.0, 0.5)    # PEFT does less: compared with the peers, never one itself
    assert got["reference"] == ("", "")
    table = report.summary_table(rows)
    assert "x base" in table and "x peer" in table


def test_one_skip_line_per_provider_with_its_cases():
    cases = build_cases("cpu-small", ["fwd", "fwdbwd", "decode", "mlp"], None)
    rows = []
    for c in cases:
        rows.append(_row(c, "cuda", status="skipped: cuda: needs a CUDA device"))
        rows.append(_row(c, "peft", ms=1.0) if not c.grad else _row(
            c, "peft", status="skipped: peft: mixed-batch adapter_names is inference-only"))
        why = "forward only (no backward)" if c.grad else ("decode kernel" if c.op != "decode" else None)
        rows.append(_row(c, "cuda-one", status=f"skipped: cuda-one: {why}") if why else _row(c, "cuda-one", ms=1.0))
    lines = report.skip_lines(rows)
    assert lines == ["  peft: mixed-batch adapter_names is inference-only (cases 2, 6)",
                     "  cuda: needs a CUDA device (all cases)",
                     "  cuda-one: decode kernel (cases 0-1, 5); forward only (no backward) (cases 2, 6)"]
    assert report.skip_lines([_row(cases[0], "cuda", status="skipped: cuda: x"), _row(cases[1], "cuda", ms=1.0)]) \
        == ["  cuda: x (case 0)"]


def test_number_format():
    assert [report.fmt(v) for v in (0.0, 1234.5, 123.4, 12.34, 1.234, 0.01234, 0.00001234, "", None)] == \
        ["0", "1,234", "123", "12.3", "1.23", "0.0123", "1.23e-05", "-", "-"]
    assert report.fmt(0.1234567, 4) == "0.1235" and report.fmt(float("nan")) == "nan"


def _strict_json(line):
    def bad(const):
        raise ValueError(f"not JSON: {const}")
    return json.loads(line, parse_constant=bad)


def test_files_hold_every_column_and_stay_json(tmp_path):
    case = build_cases("cpu-small", ["decode"], None)[0]
    rows = [_row(case, "torch", status="refcheck failed: y: max err nan > tol 0.1", max_err=float("nan"),
                 tol=0.1), _row(case, "base", ms=1.0)]
    files = report.write_outputs(str(tmp_path / "sub" / "r.csv"), rows, "header", "table")
    assert [os.path.basename(f) for f in files] == ["r.csv", "r.jsonl", "r.txt"]
    jrows = [_strict_json(line) for line in open(files[1])]
    assert list(jrows[0]) == report.COLUMNS and jrows[0]["max_err"] is None and jrows[1]["median_ms"] == 1.0
    assert "new_tokens" not in jrows[0]  # a display field, not a column
    assert open(files[2]).read() == "header\n\ntable\n"
    assert open(files[0]).readline().strip() == ",".join(report.COLUMNS)


def test_plot_grouped_bars_per_case(monkeypatch, tmp_path):
    """One panel per op; per case one group of bars, one per provider that ran it: time
    over base (base itself is the line at 1; e2e: tokens/s, with every e2e provider,
    'proper' included); no line joins unrelated cases; the legend sits outside the axes."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import matplotlib.figure

    bars, plotted, saved = [], [], []
    real_bar = matplotlib.axes.Axes.bar

    def spy_bar(self, x, height, *a, **k):
        bars.append((self, round(float(x), 6), float(height), k.get("label")))
        return real_bar(self, x, height, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy_bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda *a, **k: plotted.append(a))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **k: saved.append(fig))
    e2e_case = build_cases("cpu-small", ["e2e"], None)[0]
    dec = build_cases("cpu-small", ["decode"], None)
    rows = [_row(e2e_case, "proper", ms=70.0, tokens_per_s=7000.0), _row(e2e_case, "loop", ms=90.0, tokens_per_s=700.0)]
    rows += [_row(c, p, ms=ms * (1 + c.index)) for c in dec for p, ms in (("base", 0.1), ("torch", 0.3), ("loop", 0.9))]
    report.add_ratios(rows)
    report.plot(rows, str(tmp_path / "p.png"))
    panels = {}
    for ax, x, h, label in bars:
        panels.setdefault(ax.get_title().split(":")[0], []).append((x, h, label))
    assert sorted(panels["e2e"]) == [(-0.2, 700.0, "loop"), (0.2, 7000.0, "proper")]
    assert sorted((x, round(h, 6), label) for x, h, label in panels["decode"]) == [
        (-0.2, 9.0, "loop"), (0.2, 3.0, "torch"), (0.8, 9.0, None), (1.2, 3.0, None)]
    assert not plotted
    (fig,) = saved
    fig.canvas.draw()
    axes = {ax.get_title().split(":")[0]: ax for ax in fig.axes}
    (one,) = axes["decode"].get_lines()
    assert list(one.get_ydata()) == [1.0, 1.0] and one.get_label() == "base linear (= 1)"
    assert not axes["e2e"].get_lines()
    for ax in fig.axes:
        leg, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert leg.x0 >= box.x1 and not math.isnan(leg.x0)
