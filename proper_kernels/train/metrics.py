"""The LaMP metrics, computed with scikit-learn and rouge-score.

As the LaMP evaluation defines them (predictions and golds stripped first):

* classification (LaMP-1, LaMP-2): accuracy, and F1 macro-averaged over the task's
  label set; a prediction that is no label maps to -1, which is wrong for accuracy
  and a false negative of the gold class for F1.
* rating (LaMP-3): MAE and RMSE of the scores; a prediction that is no finite number
  counts as the score farthest from the gold (1 or 5).
* generation (LaMP-4 .. LaMP-7): ROUGE-1 and ROUGE-L F-measure (rouge-score's
  default tokenizer, no stemming), averaged over examples. (LaMP aggregates through
  the ``evaluate`` library's bootstrap, whose middle value estimates this mean.)

The libraries are imported on first use (they are in the ``train`` extra).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["METRICS", "HIGHER_IS_BETTER", "compute_metrics", "classification_metrics", "rating_metrics",
           "generation_metrics"]

METRICS = {"classification": ("accuracy", "f1"), "rating": ("mae", "rmse"), "generation": ("rouge-1", "rouge-L")}
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False, "rouge-1": True, "rouge-L": True,
                    "loss": False}


def _check(preds: Sequence[str], golds: Sequence[str]) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"preds and golds must have the same length, got {len(preds)} and {len(golds)}")


def classification_metrics(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> Dict[str, float]:
    """accuracy and macro F1 over ``labels`` (see the module docstring)."""
    from sklearn.metrics import accuracy_score, f1_score

    _check(preds, golds)
    if not labels:
        raise ValueError("classification metrics need the label set")
    index = {str(label).strip(): i for i, label in enumerate(labels)}
    p = [index.get(str(x).strip(), -1) for x in preds]
    g = [index.get(str(x).strip(), -1) for x in golds]
    return {"accuracy": float(accuracy_score(g, p)),
            "f1": float(f1_score(g, p, labels=list(range(len(labels))), average="macro", zero_division=0))}


def _score(text: str, gold: float) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        v = float("nan")
    if math.isfinite(v):
        return v
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def rating_metrics(preds: Sequence[str], golds: Sequence[str]) -> Dict[str, float]:
    """MAE and RMSE (see the module docstring)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    _check(preds, golds)
    g = [float(str(x).strip()) for x in golds]
    p = [_score(x, y) for x, y in zip(preds, g)]
    return {"mae": float(mean_absolute_error(g, p)), "rmse": float(math.sqrt(mean_squared_error(g, p)))}


_SCORER = None


def generation_metrics(preds: Sequence[str], golds: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (see the module docstring)."""
    global _SCORER
    from rouge_score import rouge_scorer

    _check(preds, golds)
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1 = rl = 0.0
    for p, g in zip(preds, golds):
        s = _SCORER.score(str(g).strip(), str(p).strip())
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = max(1, len(preds))
    return {"rouge-1": r1 / n, "rouge-L": rl / n}


def compute_metrics(kind: str, preds: Sequence[str], golds: Sequence[str],
                    labels: Optional[Sequence[str]] = None) -> Dict[str, Optional[float]]:
    """The metrics of ``kind`` (METRICS[kind]); every value None when there is no example."""
    if kind not in METRICS:
        raise ValueError(f"kind must be one of {sorted(METRICS)}, got {kind!r}")
    if not preds and not golds:
        return {m: None for m in METRICS[kind]}
    if kind == "classification":
        return classification_metrics(preds, golds, labels or ())
    if kind == "rating":
        return rating_metrics(preds, golds)
    return generation_metrics(preds, golds)
