"""``results.json`` and ``results.md``: each stage's test metrics, overall and by user
bucket (sparse / medium / rich by history size), and what each stage's training did."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .data import BUCKETS
from .metrics import HIGHER_IS_BETTER

__all__ = ["write_report", "render_markdown"]

ROWS = (("base", "base model"), ("population", "+ population"), ("group", "+ group"), ("user", "+ user (PROPER)"))
NAMES = {"accuracy": "accuracy", "f1": "F1 (macro)", "mae": "MAE", "rmse": "RMSE", "rouge-1": "ROUGE-1",
         "rouge-L": "ROUGE-L", "loss": "test loss (nats per target token)"}


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}"


def _rows(results: dict):
    """(stage key, row label): the user stage without a group stage before it is not PROPER."""
    stages = results.get("config", {}).get("stages", ())
    return [(k, "+ user (no group stage)" if k == "user" and "group" not in stages else label) for k, label in ROWS]


def _table(results: dict, metric: str) -> List[str]:
    groups = ("all",) + BUCKETS
    stages: Dict[str, dict] = results["stages"]
    first = next(iter(stages.values()), None)
    counts = {g: (first["metrics"][g]["n"] if first else 0) for g in groups}
    users = results.get("bucket_users", {})
    head = [f"all ({counts['all']})"] + [f"{g} ({users.get(g, '?')} users, {counts[g]} ex.)" for g in BUCKETS]
    lines = ["| stage | " + " | ".join(head) + " |", "|---|" + "---|" * len(groups)]
    for key, label in _rows(results):
        if key in stages:
            m = stages[key]["metrics"]
            lines.append(f"| {label} | " + " | ".join(_fmt(m[g].get(metric)) for g in groups) + " |")
    return lines


def render_markdown(results: dict) -> str:
    """The Markdown report of ``results`` (the dict written to results.json)."""
    e1, e2 = results["bucket_edges"]
    out = [f"# PROPER on {results['task']} ({results['kind']})", "",
           f"- data: `{results['source']}`; model: `{results['model']}`",
           f"- {results['users']} users; {results['train_examples']} training, {results['val_examples']} validation, "
           f"{results['test_examples']} test examples",
           f"- user buckets by history size (training examples): sparse <= {e1:g} < medium <= {e2:g} < rich",
           "- metrics on the test split: greedy generation, many users per batch; the test loss is teacher-forced"]
    if results.get("pending"):
        stop = results.get("stopped_after")
        out.append(f"- not run yet: {', '.join(results['pending'])}"
                   + (f" (stopped after {stop}; rerun with --resume)" if stop else ""))
    for note in results.get("notes", []):
        out.append(f"- note: {note}")
    for metric in results["metrics"]:
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        out += ["", f"## {NAMES.get(metric, metric)} ({better} is better)", ""] + _table(results, metric)
    out += ["", "## Training", "", "| stage | epochs | lr | train loss (per epoch) | validation loss | seconds |",
            "|---|---|---|---|---|---|"]
    for key, label in _rows(results)[1:]:
        st = results["stages"].get(key)
        if not st:
            continue
        t = st["train"]
        epochs = t.get("epochs", t.get("epochs_run"))
        if key == "user":
            epochs = f"{t['epochs_run']} of {t['max_epochs']}"
        tl = ", ".join(f"{x:.3f}" for x in t.get("train_loss", []))
        vl = ", ".join(f"{x:.3f}" for x in t.get("val_loss", []))
        out.append(f"| {label} | {epochs} | {t['lr']:g} | {tl} | {vl} | {t['seconds']:.0f} |")
    user = results["stages"].get("user")
    if user:
        t = user["train"]
        out += ["", f"User stage, per-user early stopping: users by best epoch (0 = starting rows kept) "
                    f"{t['users_by_best_epoch']}; {t['users_without_validation']} users without validation data "
                    f"(kept at their starting rows); mean validation loss {t['val_loss_start']:.4f} -> "
                    f"{t['val_loss_best']:.4f}; users above their starting validation loss: {t['users_above_start']}."]
    return "\n".join(out) + "\n"


def write_report(directory: str, results: dict) -> None:
    """Write ``results.json`` and ``results.md`` into ``directory``."""
    with open(os.path.join(directory, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(directory, "results.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(results))
