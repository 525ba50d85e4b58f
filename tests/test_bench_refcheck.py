"""benchmarks/refcheck.py: the reference check every provider passes before it is
timed, by the package's one tolerance rule (proper_kernels.testing.compare)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from presets import build_cases  # noqa: E402
from providers import REGISTRY, TorchProvider, strip_params  # noqa: E402
from refcheck import Oracle  # noqa: E402
from steps import make_layers, make_step, output_names  # noqa: E402

CPU = torch.device("cpu")


def _case(op, law=None, T=None):
    return [c for c in build_cases("cpu-small", [op], [law] if law else None) if T is None or c.T == T][0]


def _check(case, provider, dtype):
    layers, x, ids, pl, dy = make_layers(case, dtype, CPU, 0)
    out = make_step(case, provider, layers, x, ids, pl, dy)()
    oracle = Oracle(case, layers, x, ids, pl, dy)
    return oracle.check(provider.work, out, output_names(case, layers, provider.work), dtype), oracle, out


@pytest.mark.parametrize("T,drop", [(1, "experts"), (16, "user_router")])
def test_bf16_refcheck_catches_a_missing_term(T, drop):
    """In bf16 a provider that leaves out the whole expert mixture (or the LoRA-aware
    router) must fail the check: the tolerance may not be a sizeable fraction of |y|."""

    class Wrong(TorchProvider):
        def compose(self, case, layers, ids, plan):
            if drop == "experts":
                layers = [strip_params(p, "users") for p in layers]
            else:
                layers = [dict(p, user_router=None) for p in layers]
            return super().compose(case, layers, ids, plan)

    (ok, err, tol, msg), _, _ = _check(_case("decode", T=T), Wrong(), torch.bfloat16)
    assert not ok and msg.startswith("y: max err"), msg
    assert err > tol


def test_training_checks_every_gradient_in_bf16():
    """fwdbwd: y and every gradient are checked; the plain providers pass in bf16 on a
    skewed batch, and a wrong gradient fails under its own name."""
    case = _case("fwdbwd", law="skewed")
    for name in ("torch", "loop", "reference"):
        (ok, err, tol, msg), oracle, out = _check(case, REGISTRY[name], torch.bfloat16)
        assert ok, (name, msg)
        assert 0 <= err <= tol
    names = output_names(case, oracle.layers, "full")
    assert names[:2] == ["y", "dx"] and "duser_router" in names and "dexpert_B" in names
    k = names.index("dexpert_B")
    bad = list(out)
    bad[k] = out[k] * 1.05
    ok, _, _, msg = oracle.check("full", bad, names, torch.bfloat16)
    assert not ok and msg.startswith("dexpert_B: max err"), msg


def test_tolerance_is_the_package_rule():
    """The check's tolerance is proper_kernels.testing.tolerance with the fp32 reference
    as the oracle and the same-dtype loop as the baseline (factor 3, 4 ulps floor)."""
    from proper_kernels.testing import TOL_FACTOR, TOL_ULPS, tolerance

    assert (TOL_FACTOR, TOL_ULPS) == (3.0, 4)
    case = _case("decode", T=16)
    (ok, err, tol, _), oracle, out = _check(case, REGISTRY["torch"], torch.bfloat16)
    (ref,), (loop,) = oracle.outputs("full")
    assert ref.dtype == torch.float32 and loop.dtype == torch.bfloat16
    assert ok and tol == pytest.approx(tolerance(ref, loop, torch.bfloat16))
    assert err == pytest.approx(float((out[0].double() - ref.double()).abs().max()))
    by_hand = 3 * float((loop.double() - ref.double()).abs().max()) \
        + 4 * torch.finfo(torch.bfloat16).eps * max(float(ref.abs().max()), 1.0)
    assert tol == pytest.approx(by_hand)


def test_oracle_per_work_and_output_count():
    """A provider that does less work (base) is checked against the reference of that
    work, not the full op's; a provider returning the wrong number of outputs fails."""
    case = _case("decode", T=1)
    (ok, _, _, msg), oracle, _ = _check(case, REGISTRY["base"], torch.float32)
    assert ok, msg
    assert not torch.equal(oracle.outputs("base")[0][0], oracle.outputs("full")[0][0])
    (_, _, _, _), oracle, out = _check(case, REGISTRY["torch"], torch.float32)
    ok, err, tol, msg = oracle.check("full", list(out) * 2, ["y", "y"], torch.float32)
    assert not ok and msg == "2 outputs, expected 1"
