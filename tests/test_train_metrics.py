"""proper_kernels.train.metrics: the LaMP metrics on cases worked out by hand."""
import math

import pytest

from proper_kernels.train.metrics import (classification_metrics, compute_metrics, generation_metrics,
                                          rating_metrics)


def test_classification_accuracy_and_macro_f1():
    # class a: tp 1, fn 1, fp 0 -> F1 2/3; class b: tp 1, fn 1, fp 1 -> F1 1/2;
    # "x" is no label: wrong, and a false negative of its gold (b)
    m = classification_metrics([" a", "b", "b", "x"], ["a", "a", "b", "b "], ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_classification_f1_averages_over_the_whole_label_set():
    # "c" never occurs: its F1 is 0 and still counts in the macro average
    m = classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="label set"):
        classification_metrics(["a"], ["a"], [])


def test_rating_mae_rmse_and_unparsable_predictions():
    m = rating_metrics(["4", "2", "5"], ["5", "2", "3"])
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    # not a number -> the score farthest from the gold: 5 for gold 2, 1 for gold 4
    m = rating_metrics(["five", "nan"], ["2", "4"])
    assert m["mae"] == pytest.approx(3.0) and m["rmse"] == pytest.approx(3.0)


def test_generation_rouge():
    m = generation_metrics(["the cat sat", "dog"], ["the cat sat", "a bird"])
    assert m["rouge-1"] == pytest.approx(0.5) and m["rouge-L"] == pytest.approx(0.5)
    # "the cat" vs "the cat sat": precision 1, recall 2/3 -> F 0.8
    m = generation_metrics(["the cat"], ["the cat sat"])
    assert m["rouge-1"] == pytest.approx(0.8) and m["rouge-L"] == pytest.approx(0.8)
    # order matters for ROUGE-L only
    m = generation_metrics(["c b a"], ["a b c"])
    assert m["rouge-1"] == pytest.approx(1.0) and m["rouge-L"] == pytest.approx(1 / 3)


def test_compute_metrics_dispatch_and_empty():
    assert compute_metrics("generation", [], []) == {"rouge-1": None, "rouge-L": None}
    assert compute_metrics("rating", ["1"], ["1"]) == {"mae": 0.0, "rmse": 0.0}
    assert compute_metrics("classification", ["a"], ["a"], ["a", "b"])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="kind must be one of"):
        compute_metrics("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="same length"):
        generation_metrics(["a"], [])
