#!/usr/bin/env python
"""One benchmark CLI for every op, provider and shape preset of proper-kernels.

    python benchmarks/run.py                       # cpu-small on CPU, square-4096 on GPU
    python benchmarks/run.py --list                # presets, providers, ops (and cases)
    python benchmarks/run.py --preset square-4096 --op decode,fwd --providers torch,triton \\
        --popularity distinct,zipf --output benchmarks/results/h100-2025-01-01-square-4096 --plot

Every provider runs on the same inputs. Before timing, each one's output (and, for
``fwdbwd`` and mlp training, its gradients) is checked against the fp32 reference
(refcheck.py; ``--no-refcheck`` skips that); a provider that fails is reported, not
timed, and makes the exit status 1. Times are medians with p20/p80 (timing.py),
reported with the time over the base linear and over the fastest peer, TFLOP/s, GB/s
and the fraction of the roofline measured on this device in the same run, at the
case's own shape (roofline.py); report.py prints the table and writes the files.

Imports triton, transformers and peft only inside the providers that need them.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import roofline  # noqa: E402
import timing  # noqa: E402
from decode_table import update_decode_table  # noqa: E402
from presets import OP_DOC, OPS, PRESETS, Case, build_cases, default_preset  # noqa: E402
from providers import REGISTRY  # noqa: E402
from refcheck import RULE, Oracle  # noqa: E402
from report import ALL_PROVIDERS, WIDTH, add_ratios, legend, new_row, plot, skip_lines, summary_table, write_outputs  # noqa: E402
from steps import make_layers, make_step, output_names  # noqa: E402

from proper_kernels.testing import POPULARITY_LAWS as LAWS  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# A row faster than this multiple of its roofline shows that no sound ceiling was
# measured at its shape: its %roof is left out rather than printed above 100.
ROOF_SLACK = 1.1


class UsageError(Exception):
    """A bad command-line value: printed with the valid choices, exit status 2."""


# --------------------------------------------------------------------------- arguments
def _split(value: Optional[str], flag: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"{flag} {value!r} is an empty list (leave the flag out for the default)")
    return items


def _check_choices(kind: str, values: Optional[Sequence[str]], valid: Sequence[str]) -> None:
    for v in values or ():
        if v not in valid:
            raise UsageError(f"unknown {kind} {v!r}; valid {kind}s: {', '.join(valid)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Check every provider against the fp32 reference, then time it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS) + "\nproviders: " + ", ".join(ALL_PROVIDERS) + "\nops: " + ", ".join(OPS),
    )
    ap.add_argument("--op", help=f"comma list of ops ({', '.join(OPS)}); default: all the preset has")
    ap.add_argument("--providers", default="all", help=f"comma list of providers or 'all' ({', '.join(ALL_PROVIDERS)}; 'proper' is e2e only)")
    ap.add_argument("--preset", help="shape preset (default: square-4096 on CUDA, cpu-small on CPU)")
    ap.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the preset's)")
    ap.add_argument("--popularity", help=f"comma list of laws or 'all' ({', '.join(LAWS)}); default: the preset's")
    ap.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--output", help="write PREFIX.csv, PREFIX.jsonl and PREFIX.txt (an extension is dropped)")
    ap.add_argument("--plot", nargs="?", const="auto", help="write a PNG (default PREFIX.png or benchmark.png); needs matplotlib")
    ap.add_argument("--refcheck", dest="refcheck", action="store_true", default=True, help="check before timing (default)")
    ap.add_argument("--no-refcheck", dest="refcheck", action="store_false", help="skip the reference check")
    ap.add_argument("--case", help="comma list of case indices to run (see --list --preset P); default: all")
    ap.add_argument("--list", action="store_true", help="list presets, providers, ops (and the preset's cases)")
    ap.add_argument("--profile", metavar="DIR", help="torch.profiler trace per timed case and provider into DIR")
    ap.add_argument("--ncu", action="store_true", help="print the ncu command line profiling each case, run nothing")
    ap.add_argument("--iters", type=int, help="run each case this many times untimed (for ncu/nsys) instead of timing")
    ap.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (GPU: do_bench rep; CPU: wall)")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's, or 1 when the machine "
                    "is already busy: a loaded CPU makes multi-thread barriers dominate small ops)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--user-cache-size", type=int, help="paged op: device slots C per layer (default: the preset's)")
    ap.add_argument("--decode-table", metavar="JSON",
                    help="after a GPU run with decode rows of providers cuda and triton, write this GPU's entry "
                    "(the largest T at which cuda won) into JSON, e.g. proper_kernels/ops/decode_table.json")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    args.ops = _split(args.op, "--op")
    _check_choices("op", args.ops, OPS)
    provs = _split(args.providers, "--providers")
    args.provider_list = list(ALL_PROVIDERS) if provs == ["all"] else provs
    _check_choices("provider", args.provider_list, ALL_PROVIDERS)
    laws = _split(args.popularity, "--popularity")
    args.laws = list(LAWS) if laws == ["all"] else laws
    _check_choices("popularity law", args.laws, LAWS)
    for flag, value in (("--threads", args.threads), ("--iters", args.iters), ("--rep-ms", args.rep_ms),
                        ("--user-cache-size", args.user_cache_size)):
        if value is not None and not value > 0:  # "not >": NaN too
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a torch device; use cpu or cuda[:i]") from None
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if args.decode_table and not {"cuda", "triton"} <= set(args.provider_list):
        raise UsageError("--decode-table compares providers cuda and triton: include both in --providers")
    return args


# --------------------------------------------------------------------------- environment
def env_info(device: torch.device) -> Dict[str, str]:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git: leave it empty
        commit = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "triton": version("triton"),
            "git_commit": commit, "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}


# --------------------------------------------------------------------------- listing
def list_all(args, device) -> None:
    print("presets:")
    for name, spec in PRESETS.items():
        print(f"  {name:14s} {spec['doc']}")
    print(f"  (default here: {default_preset(device.type)})")
    print("\nops:")
    for op in OPS:
        print(f"  {op:14s} {OP_DOC[op]}")
    print("\nproviders:")
    for name, p in REGISTRY.items():
        print(f"  {name:14s} {p.doc}")
    print(f"  {'proper':14s} e2e only: the PROPER model with every user in one batch "
          "(e2e also runs loop: one user at a time, peft: PEFT mixed-batch generation)")
    print("\npopularity laws: " + ", ".join(LAWS))
    preset = args.preset or default_preset(device.type)
    cases = build_cases(preset, args.ops, args.laws, device.type)
    print(f"\ncases of {preset} (--case N runs one):")
    for c in cases:
        print(f"  {c.index:3d}  {c.op:7s} {c.mode:10s} {c.shape():48s} {c.law}")


def ncu_lines(args, cases, preset, dtype_name) -> List[str]:
    out = []
    # The same --popularity as this call: case indices depend on it.
    pop = f" --popularity {args.popularity}" if args.popularity else ""
    for c in cases:
        for prov in args.provider_list:
            # e2e is not profiled per kernel; skip the providers that only skip this case
            # (the base checks: e2e-only, decode-only, forward-only; not the device's).
            if c.op in ("e2e", "paged") or prov not in REGISTRY or REGISTRY[prov].op_skip_reason(c):
                continue
            if prov == "triton":
                # The fused ops push these NVTX ranges (proper_kernels/ops/autograd.py).
                ranges = ['--nvtx-include "proper_kernels::mixture_fwd/"']
                if c.grad:
                    ranges.append('--nvtx-include "proper_kernels::mixture_bwd/"')
                kern = '-k "regex:mixture|seg_xty" '
            else:
                ranges = [f'--nvtx-include "{bench_label(c, prov)}/"']
                kern = '-k "regex:lora_mixture" ' if prov.startswith("cuda") else ""
            out.append(
                f"ncu --nvtx {' '.join(ranges)} {kern}--set full -o ncu-{c.op}-case{c.index}-{prov} "
                f"python benchmarks/run.py --preset {preset} --op {c.op} --providers {prov} --case {c.index} "
                f"--dtype {dtype_name}{pop} --no-refcheck --iters 3 --no-progress"
            )
    return out


def bench_label(case: Case, provider: str) -> str:
    return f"bench::{case.op}::{provider}::case{case.index}"


# --------------------------------------------------------------------------- one case
def _error_status(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _roofline(row, case, cost, ceilings: roofline.CaseCeilings, dtype) -> None:
    """Fill a timed row's bytes, flops, rates and roofline (none for e2e, none where its
    ceiling could not be measured or the row beat it: see ROOF_SLACK)."""
    med = row["median_ms"]
    row.update(bytes=cost["bytes"], flops=cost["flops"], tflops=cost["flops"] / (med * 1e-3) / 1e12,
               gbps=cost["bytes"] / (med * 1e-3) / 1e9)
    try:
        ceiling = ceilings.for_row(case, cost)
    except Exception as exc:  # noqa: BLE001 - e.g. no memory left for the ceiling's GEMM
        row["note"] = "; ".join(filter(None, [row["note"], f"no roofline: ceiling not measured ({_error_status(exc)})"]))
        return
    roof = roofline.roofline_ms(cost, ceiling, dtype)
    row.update(roofline_ms=roof, ceiling_gbps=ceiling.bandwidth / 1e9, ceiling_tflops=ceiling.rate(dtype) / 1e12)
    pct = 100.0 * roof / med
    if pct <= 100.0 * ROOF_SLACK:
        row["roofline_pct"] = pct
    else:
        row["note"] = "; ".join(filter(None, [row["note"], f"no roofline: {pct:.0f}% of the ceiling measured at "
                                              "this shape, so that ceiling is not sound"]))


def _measure(step, row, case, args, device, label: str, graph_safe: bool = True) -> bool:
    """Run the step untimed (--iters: the row's status says so) or time it into the row
    (quantiles, timer, peak memory; --profile also traces it). True when timed."""
    if args.iters:
        row["status"] = timing.run_untimed(step, label, device, args.iters)
        return False
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with timing.nvtx(label, device):
        med, p20, p80, timer = timing.time_fn(step, device, case, args.rep_ms, graph_safe)
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, timer=timer)
    if args.profile:
        with timing.nvtx(label, device):
            timing.profile_case(step, device, f"{label}-{case.mode}-T{case.T}-{case.law}", args.profile)
    return True


def run_case(case: Case, args, device, dtype, base_row, ceilings) -> List[dict]:
    """Check then time every requested provider on one case; one row per provider."""
    if case.op == "e2e":
        return run_e2e_case(case, args, device, dtype, base_row)
    if case.op == "paged":  # rows of the paged and the resident user bank (benchmarks/paged.py)
        from paged import run_paged_case

        return run_paged_case(case, args, device, dtype, base_row)
    rows = []
    layers, x, ids, pl, dy = make_layers(case, dtype, device, args.seed)
    n_active = int(pl.active_users.numel())
    oracle = Oracle(case, layers, x, ids, pl, dy) if args.refcheck else None
    elem = torch.finfo(dtype).bits // 8
    for name in [p for p in args.provider_list if p in REGISTRY]:
        prov = REGISTRY[name]
        row = new_row(base_row, provider=name, users=n_active)
        why = prov.skip_reason(case, device)
        if why:
            row["status"] = "skipped: " + why
            rows.append(row)
            continue
        label = bench_label(case, name)
        try:
            row["note"] = prov.note_for(case, layers, x, ids, pl)
            if name == "torch-compile":
                torch._dynamo.reset()  # a fresh compile per case (no stale recompile limits)
            step = make_step(case, prov, layers, x, ids, pl, dy)
            if args.refcheck:
                out = step()
                timing.sync(device)
                ok, err, tol, msg = oracle.check(prov.work, out, output_names(case, layers, prov.work), dtype)
                row.update(refcheck="pass" if ok else "fail", max_err=err, tol=tol)
                del out
                if not ok:
                    row["status"] = f"refcheck failed: {msg}"
                    rows.append(row)
                    continue
            else:
                row["refcheck"] = "off"
            if _measure(step, row, case, args, device, label, prov.graph_safe(case)):
                if case.op == "mlp":
                    row["tokens_per_s"] = case.T / (row["median_ms"] * 1e-3)
                _roofline(row, case, roofline.case_cost(case, prov.work, elem, n_active), ceilings, dtype)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next provider
            row["status"] = _error_status(exc)
        rows.append(row)
    return rows


def run_e2e_case(case, args, device, dtype, base_row) -> List[dict]:
    import e2e

    rows = []
    why = e2e.integration_skip_reason()
    for name in [p for p in e2e.E2E_PROVIDERS[case.mode] if p in args.provider_list]:
        row = new_row(base_row, provider=name, users=case.N, refcheck="n/a", note=e2e.provider_note(case, name))
        skip = why or e2e.provider_skip_reason(name)
        if skip:
            row["status"] = "skipped: " + skip
            rows.append(row)
            continue
        try:
            step = e2e.make_fn(case, name, case.mode, device, dtype)
            if _measure(step, row, case, args, device, bench_label(case, name)):
                row["tokens_per_s"] = e2e.tokens_per_step(case, case.mode, name) / (row["median_ms"] * 1e-3)
        except Exception as exc:  # noqa: BLE001
            row["status"] = _error_status(exc)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main
def _case_row(case: Case, dtype_name: str, env: Dict[str, str]) -> Dict[str, object]:
    return dict(case=case.index, op=case.op, mode=case.mode, shape=case.shape(), T=case.T, d_in=case.d_in,
                d_out=case.d_out, d_ff=case.d_ff, K=case.K, r=case.r, r_u=case.r_u, N=case.N,
                popularity=case.law, dtype=dtype_name, new_tokens=case.new_tokens, **env)


def _select_cases(args, preset: str) -> List[Case]:
    cases = build_cases(preset, args.ops, args.laws, args.device_type)
    if args.ops and not cases:
        have = ", ".join(PRESETS[preset]["ops"])
        raise UsageError(f"preset {preset!r} has no cases for op(s) {', '.join(args.ops)}; its ops: {have}")
    if args.case is not None:
        try:
            wanted = [int(v) for v in _split(args.case, "--case")]
        except ValueError:
            raise UsageError(f"--case takes a comma list of case indices, got {args.case!r}") from None
        idx = [c.index for c in cases]
        missing = [i for i in wanted if i not in idx]
        if missing:
            valid = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ", ".join(map(str, idx))
            raise UsageError(f"--case {missing[0]} is not a case of {preset}"
                             + (f" with --op {args.op}" if args.ops else "") + f" (valid: {valid}; see --list)")
        cases = [c for c in cases if c.index in wanted]
    return cases


def _threads_note(args) -> str:
    """Set the CPU threads (--threads, or 1 on a machine already busy); the header's words."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    note = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.get_num_threads() > 1 and load > cores - 0.5:
        torch.set_num_threads(1)
        note = f" (load average {load:.1f} on {cores} cores: 1 thread; --threads overrides)"
    return f"  threads={torch.get_num_threads()}" + note


def _run_cases(cases, args, device, dtype, dtype_name, env, ceilings) -> tuple:
    """(rows, warnings): every case's rows; the warnings raised meanwhile, kept for
    after the table (one each) so that none lands in the middle of it."""
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases), desc="cases", disable=args.no_progress, file=sys.stderr, leave=False)
    except ImportError:
        bar = None
    rows: List[dict] = []
    with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(f"#{case.index} {case.op} T={case.T} {case.law}")
            rows.extend(run_case(case, args, device, dtype, _case_row(case, dtype_name, env), ceilings))
            if bar is not None:
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    seen = {}
    for w in caught:
        seen.setdefault((w.category.__name__, str(w.message)), f"{w.filename}:{w.lineno}")
    return rows, [line for (cat, msg), where in seen.items()
                  for line in textwrap.wrap(f"{cat}: {msg} ({where})", WIDTH - 2, initial_indent="  ",
                                            subsequent_indent="    ")]


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device_type = device.type
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch.cuda.is_available() is False")
    if args.list:
        list_all(args, device)
        return 0
    if args.decode_table and device.type != "cuda" and not args.ncu:
        # Refuse before timing anything: the table's entry needs the cuda provider.
        print("error: --decode-table needs a CUDA device (it times the cuda and triton providers)", file=sys.stderr)
        return 2
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
            return 2
    preset = args.preset or default_preset(device.type)
    dtype_name = args.dtype or PRESETS[preset].get("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    dtype_name = str(dtype).replace("torch.", "")
    cases = _select_cases(args, preset)
    if args.ncu:
        print("\n".join(ncu_lines(args, cases, preset, dtype_name)))
        return 0

    threads_note = _threads_note(args) if device.type == "cpu" else ""
    env = env_info(device)
    env["command"] = ("python benchmarks/run.py " + shlex.join(args.argv)).rstrip()
    t_start = time.perf_counter()
    # The device-wide GEMM ceiling of the run's dtype (and fp32, for reference); each
    # row's roofline takes the best of it and the ceiling at the row's own shape.
    device_ceiling = roofline.measure_device(device, dtypes=tuple(dict.fromkeys((dtype, torch.float32))))
    header = "\n".join([
        f"proper-kernels benchmark  preset={preset}  dtype={dtype_name}  device={device}"
        + (f" ({env['gpu']})" if env["gpu"] else ""),
        f"torch={env['torch']}  triton={env['triton'] or '-'}  commit={env['git_commit'] or '-'}" + threads_note,
        f"command: {env['command']}",
        f"measured ceilings: copy {device_ceiling.bandwidth / 1e9:.1f} GB/s; GEMM "
        + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in device_ceiling.gemm_rate.items())
        + " (device-wide; each row also at its own shape)",
        "refcheck: " + (f"on ({RULE})" if args.refcheck else "off"),
    ])
    print(header, flush=True)
    ceilings = roofline.CaseCeilings(device, dtype, device_ceiling)
    rows, caught = _run_cases(cases, args, device, dtype, dtype_name, env, ceilings)
    add_ratios(rows)
    table = summary_table(rows)
    print()
    print(table)
    notes = legend(rows)
    skips = skip_lines(rows)
    if notes:
        print("\n" + "\n".join(notes))
    if skips:
        print("\nskipped providers:\n" + "\n".join(skips))
    if caught:
        print("\nwarnings raised during the run (once each):\n" + "\n".join(caught))
    elapsed = time.perf_counter() - t_start
    n_failed = sum(r["status"].startswith(("refcheck failed", "error")) for r in rows)
    print(f"\n{len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} timed, {n_failed} failed, "
          f"in {elapsed:.1f} s")
    prefix = None
    if args.output:
        files = write_outputs(args.output, rows, header, "\n".join([table, ""] + notes + ["", "skipped providers:"]
                                                                    + skips))
        prefix = os.path.splitext(files[0])[0]
        print("wrote " + ", ".join(files))
    if args.plot is not None:
        plot(rows, args.plot if args.plot != "auto" else ((prefix or "benchmark") + ".png"))
    if args.decode_table:
        try:
            major, minor = torch.cuda.get_device_capability(device)
            entry = update_decode_table(args.decode_table, rows, f"sm_{major}{minor}", env, args.argv)
        except ValueError as exc:
            print(f"error: --decode-table: {exc}", file=sys.stderr)
            return 2
        print(f"decode table {args.decode_table}: {entry['arch']} {entry['dtype']} max_T = {entry['max_T']}, "
              f"launch = {entry['launch']}")
    return 1 if n_failed else 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
