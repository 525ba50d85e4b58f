"""The CUDA decode kernel's dispatch table from a benchmark run (``--decode-table``).

From the decode rows of providers cuda/cuda-one and triton: per dtype, the largest
token count up to which the CUDA kernel won every case, and its faster launch mode;
written as this GPU's entry of ``proper_kernels/ops/decode_table.json``, which
``lora_mixture(backend="auto")`` reads.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List


def decode_crossover(rows: List[dict]) -> Dict[str, Dict[str, object]]:
    """Per dtype, from the decode rows: the largest measured T at which the CUDA
    kernel (its faster launch mode, providers cuda / cuda-one) was at least as fast as
    triton on every case of that T (all shapes and popularity laws) and at every
    smaller measured T (0 if it lost at the smallest); the launch mode ("two" or
    "one") with the lower summed time over those cases (over all cases when
    max_T = 0); and the median times behind it."""
    mode_of = {"cuda": "two", "cuda-one": "one"}
    times: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["op"] == "decode" and r["status"] == "ok" and r["provider"] in ("cuda", "cuda-one", "triton"):
            times.setdefault((r["dtype"], r["T"], r["case"]), {})[r["provider"]] = r["median_ms"]
    per_dtype: Dict[str, Dict[int, List[Dict[str, float]]]] = {}
    for (dtype, T, _case), t in times.items():
        if "triton" in t and set(t) & set(mode_of):
            per_dtype.setdefault(dtype, {}).setdefault(T, []).append(t)
    out = {}
    for dtype, by_T in per_dtype.items():
        max_T = 0
        for T in sorted(by_T):
            if not all(min(t[p] for p in mode_of if p in t) <= t["triton"] for t in by_T[T]):
                break
            max_T = T
        cases = [t for T in sorted(by_T) if max_T == 0 or T <= max_T for t in by_T[T]]
        totals = {mode_of[p]: sum(t[p] for t in cases) for p in mode_of if all(p in t for t in cases)}
        launch = min(totals, key=totals.get) if totals else "two"
        evidence = {str(T): [{p: round(v, 5) for p, v in sorted(t.items())} for t in by_T[T]] for T in sorted(by_T)}
        out[dtype] = {"max_T": max_T, "launch": launch, "evidence_ms": evidence}
    return out


def update_decode_table(path: str, rows: List[dict], arch: str, env: Dict[str, str], argv: List[str]) -> dict:
    """Write the entry (arch, dtype) of this run into the dispatch table at `path`
    (proper_kernels/ops/decode_table.json format), replacing an older one; returns it."""
    found = decode_crossover(rows)
    if not found:
        raise ValueError("no decode case has timed rows of both providers cuda and triton "
                         "(see the skipped providers above)")
    table = {"about": "", "entries": []}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    entry = None
    for dtype, res in sorted(found.items()):
        entry = {
            "arch": arch, "dtype": dtype, "max_T": res["max_T"], "launch": res["launch"], "measured": True,
            "source": f"python benchmarks/run.py {' '.join(argv)} on {env['gpu']} (torch {env['torch']}, "
                      f"triton {env['triton']}, commit {env['git_commit'] or '-'}, {env['timestamp']})",
            "evidence_ms": res["evidence_ms"],
        }
        table["entries"] = [e for e in table["entries"] if (e["arch"], e["dtype"]) != (arch, dtype)] + [entry]
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return entry
