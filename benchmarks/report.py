"""What the benchmark prints and writes: the summary table, the skip lines, the
CSV/JSONL/TXT files and the plot.

The printed table fits 120 columns: per case and provider the median time, the time
over the case's base linear (``x base``) and over the fastest other provider doing
the whole op (``x peer``), TFLOP/s, GB/s, % of the roofline and the reference check's
error over its tolerance; e2e rows give tokens/s. Everything else (p20/p80, bytes,
FLOPs, ceilings, notes, versions) goes to the CSV and JSONL.
"""
from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from typing import Dict, Iterable, List, Sequence

from presets import OP_DOC, OPS
from providers import PROVIDERS, REGISTRY

# "proper" is the e2e-only provider (the PROPER model, all users in one batch).
ALL_PROVIDERS = PROVIDERS + ("proper",)
WIDTH = 120
# Ops whose rows are whole-model steps, reported in tokens/s (the others: time per call).
RATE_OPS = ("e2e", "paged")

COLUMNS = [
    "case", "op", "provider", "mode", "shape", "T", "d_in", "d_out", "d_ff", "K", "r", "r_u", "N", "users",
    "popularity", "dtype", "status", "refcheck", "max_err", "tol", "median_ms", "p20_ms", "p80_ms", "x_base",
    "x_peer", "tflops", "gbps", "roofline_pct", "roofline_ms", "ceiling_gbps", "ceiling_tflops", "bytes", "flops",
    "tokens_per_s", "peak_mem_mb", "timer", "note", "device", "gpu", "torch", "triton", "git_commit", "timestamp",
    "command",
]


def new_row(base: Dict[str, object], **values) -> Dict[str, object]:
    """A row with every column: the case's fields (``base``), ``values``, the rest empty."""
    row = {k: "" for k in COLUMNS}
    row.update(base)
    row.update(values)
    return row


def _timed(r) -> bool:
    return r["status"] == "ok" and r["median_ms"] not in ("", None)


def _is_full_work(provider: str) -> bool:
    """Whether a provider computes the whole op (not base, not PEFT's users-only part)."""
    return provider not in REGISTRY or REGISTRY[provider].work == "full"


def add_ratios(rows: List[dict]) -> None:
    """Fill x_base (median over the base provider's median of the same case) and x_peer
    (time over the fastest *other* provider computing the whole op on the case; e2e:
    by tokens/s, every other provider being a peer). x_peer < 1: this row is the
    fastest, by that factor."""
    by_case: Dict[object, List[dict]] = {}
    for r in rows:
        if _timed(r):
            by_case.setdefault(r["case"], []).append(r)
    for rs in by_case.values():
        if rs[0]["op"] in RATE_OPS:
            for r in rs:
                peers = [p["tokens_per_s"] for p in rs if p is not r and p["tokens_per_s"]]
                r["x_peer"] = max(peers) / r["tokens_per_s"] if peers and r["tokens_per_s"] else ""
            continue
        base = [r["median_ms"] for r in rs if r["provider"] == "base"]
        for r in rs:
            r["x_base"] = r["median_ms"] / base[0] if base else ""
            peers = [p["median_ms"] for p in rs if p is not r and _is_full_work(p["provider"])]
            r["x_peer"] = r["median_ms"] / min(peers) if peers else ""


# --------------------------------------------------------------------------- table
def fmt(v, digits: int = 3) -> str:
    """A number for the table: ``digits`` significant digits (no exponent down to 1e-4),
    thousands separated from 1000 on, '-' when empty."""
    if v is None or v == "":
        return "-"
    if not isinstance(v, float):
        return str(v)
    if not math.isfinite(v) or v == 0:
        return str(v) if v else "0"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    if abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    decimals = digits - 1 - math.floor(math.log10(abs(v)))
    return f"{v:.{decimals}f}"


def _ratio(v) -> str:
    return "-" if v in ("", None) else fmt(float(v), 3)


def _dims(r) -> str:
    if r["op"] == "mlp":
        return f"{r['d_in']}->{r['d_ff']}->{r['d_in']}"
    return f"{r['d_in']}->{r['d_out']}"


def _check(r) -> str:
    if r["refcheck"] == "pass" and r["tol"] not in ("", None) and r["tol"] > 0:
        return f"{r['max_err'] / r['tol']:.2f}"
    return r["refcheck"] or "-"


KERNEL_HEAD = ["case", "T", "dims", "law", "provider", "median ms", "x base", "x peer", "TFLOP/s", "GB/s", "%roof",
               "err/tol"]
E2E_HEAD = ["case", "seq", "new", "law", "provider", "tok/s", "x peer", "note"]
_LEFT = {"dims", "law", "provider", "note"}


def _kernel_cells(r) -> List[str]:
    return [str(r["case"]), str(r["T"]), _dims(r), r["popularity"], r["provider"], fmt(r["median_ms"], 4),
            _ratio(r["x_base"]), _ratio(r["x_peer"]), fmt(r["tflops"]), fmt(r["gbps"]), fmt(r["roofline_pct"], 2),
            _check(r)]


def _e2e_cells(r) -> List[str]:
    return [str(r["case"]), str(r["T"]), str(r.get("new_tokens") or "-"), r["popularity"], r["provider"],
            fmt(r["tokens_per_s"]), _ratio(r["x_peer"]), r["note"]]


def _section_title(r) -> str:
    mode = f" {r['mode']}" if r["mode"] not in ("", r["op"]) else ""
    unit = "tokens/s of whole model steps" if r["op"] in RATE_OPS else "per call"
    return f"-- {r['op']}{mode}: K={r['K']} experts of rank r={r['r']}, user rank r_u={r['r_u']}, N={r['N']} users; {unit}"


def _layout(head: Sequence[str], lines: List[List[str]]):
    """A renderer of table lines: columns aligned to the widest cell of ``lines``; a
    line shorter than the head ends in free text (a status in place of the numbers)."""
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(head)]

    def render(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            last = i == len(cells) - 1 and (len(cells) < len(head) or i == len(head) - 1)
            out.append(c if last else (c.ljust(widths[i]) if head[i] in _LEFT else c.rjust(widths[i])))
        line = "  ".join(out).rstrip()
        return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."  # the CSV has all of it
    return render


def summary_table(rows: List[dict]) -> str:
    """The printed table: one section per op and adapter shape, one line per timed or
    failed row (skipped providers are left to :func:`skip_lines`), at most 120 columns.
    A case's T, dims and law are printed on its first line only."""
    shown = [r for r in rows if not str(r["status"]).startswith("skipped")]
    out: List[str] = []
    for rs, head, cells in (([r for r in shown if r["op"] not in RATE_OPS], KERNEL_HEAD, _kernel_cells),
                            ([r for r in shown if r["op"] in RATE_OPS], E2E_HEAD, _e2e_cells)):
        if not rs:
            continue
        lines = [cells(r) for r in rs]
        render = _layout(head, [l for l, r in zip(lines, rs) if r["status"] == "ok"])
        section = case = None
        for r, line in zip(rs, lines):
            if r["status"] != "ok":  # failed or untimed: the status in place of the numbers
                line = line[:5] + [str(r["status"])]
            key = (r["op"], r["mode"], r["K"], r["r"], r["r_u"], r["N"])
            if key != section:
                section, case = key, None
                out += ([""] if out else []) + [_section_title(r), render(head)]
            if r["case"] == case:
                line[:4] = ["", "", "", ""]
            case = r["case"]
            out.append(render(line))
    return "\n".join(out)


def legend(rows: List[dict]) -> List[str]:
    """What the derived columns mean, and the providers that do less work than the op."""
    lines = ["x base: time over the case's base linear alone.  x peer: time over the fastest other provider of the",
             "whole op (< 1: this one is the fastest, by that factor).  %roof: share of the roofline at the best of the",
             "device-wide and the case's own-shape ceilings.  err/tol: the reference check's max error over its "
             "tolerance."]
    less = sorted({r["provider"] for r in rows if not _is_full_work(r["provider"]) and r["provider"] != "base"
                   and r["status"] == "ok"})
    lines += [REGISTRY[p].note for p in less]
    return [l[:WIDTH] for l in lines]


def _ranges(ids: Iterable[int]) -> str:
    ids = sorted(set(ids))
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def skip_lines(rows: List[dict]) -> List[str]:
    """One line per skipped provider: its reasons, each with the cases it covers."""
    per: Dict[str, Dict[str, List[int]]] = {}
    asked: Dict[str, List[int]] = {}
    for r in rows:
        asked.setdefault(r["provider"], []).append(r["case"])
        if str(r["status"]).startswith("skipped: "):
            why = r["status"][len("skipped: "):]
            if why.startswith(r["provider"] + ": "):
                why = why[len(r["provider"]) + 2:]
            per.setdefault(r["provider"], {}).setdefault(why, []).append(r["case"])
    out = []
    for prov in sorted(per, key=lambda p: ALL_PROVIDERS.index(p) if p in ALL_PROVIDERS else len(ALL_PROVIDERS)):
        parts = []
        for why, cases in per[prov].items():
            where = ("all cases" if sorted(cases) == sorted(asked[prov])
                     else ("case " if len(set(cases)) == 1 else "cases ") + _ranges(cases))
            parts.append(f"{why} ({where})")
        out += textwrap.wrap(f"{prov}: " + "; ".join(parts), WIDTH - 2, initial_indent="  ", subsequent_indent="    ")
    return out


# --------------------------------------------------------------------------- files
def _json_value(v):
    """NaN and infinities (a failed check's error) are not JSON: null instead."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_outputs(prefix: str, rows: List[dict], header: str, table: str) -> List[str]:
    """PREFIX.csv, PREFIX.jsonl (every column) and PREFIX.txt (header and printed table)."""
    for ext in (".csv", ".jsonl", ".txt", ".png"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    with open(prefix + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: _json_value(r.get(k, "")) for k in COLUMNS}, allow_nan=False) + "\n")
    with open(prefix + ".txt", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    return [prefix + ".csv", prefix + ".jsonl", prefix + ".txt"]


# --------------------------------------------------------------------------- plot
def _panel_metric(op: str, rs: List[dict]) -> tuple:
    """(row key, axis label, log scale) of a panel: tokens/s for e2e, time over base
    where every case has its base timed (base itself is the line at 1), else median ms."""
    if op in RATE_OPS:
        return "tokens_per_s", "tokens/s (higher is better)", False
    if all(r["x_base"] not in ("", None) for r in rs):
        return "x_base", "time / base linear (lower is better)", True
    return "median_ms", "median ms (lower is better)", True


def plot(rows: List[dict], path: str) -> None:
    """One panel per op: per case a group of bars, one per provider that ran it, of the
    time over the case's base linear (tokens/s for e2e); the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if _timed(r)]
    ops = [op for op in OPS if any(r["op"] == op for r in timed)]
    if not ops:
        print("[plot] nothing was timed: no plot written")
        return
    n_cases = max(len({r["case"] for r in timed if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 1.6 * n_cases + 3.0), 3.6 * len(ops)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in timed if r["op"] == op]
        metric, label, log = _panel_metric(op, rs)
        if metric == "x_base":
            rs = [r for r in rs if r["provider"] != "base"]
            ax.axhline(1.0, color="0.2", linewidth=1.0, label="base linear (= 1)")
        cases = sorted({r["case"] for r in rs})
        order = {p: i for i, p in enumerate(ALL_PROVIDERS)}
        groups = {c: sorted((r for r in rs if r["case"] == c), key=lambda r: order.get(r["provider"], 99))
                  for c in cases}
        width = 0.8 / max(len(g) for g in groups.values())
        drawn = set()
        for i, c in enumerate(cases):
            for j, r in enumerate(groups[c]):
                prov = r["provider"]
                ax.bar(i + (j - (len(groups[c]) - 1) / 2) * width, r[metric], width,
                       label=None if prov in drawn else prov, color=colors(order.get(prov, 9) % 10))
                drawn.add(prov)
        names = {r["case"]: f"#{r['case']} {r['mode']} T={r['T']}\n{r['popularity']}" for r in rs}
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([names[c] for c in cases], fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{op}: {OP_DOC[op]}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"[plot] wrote {path}")
