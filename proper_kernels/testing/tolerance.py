"""The one tolerance rule of every comparison with the oracle.

One rule for every comparison of a kernel with the oracle, in the tests and in the
benchmark's reference check (after flash-attention's criterion): a result is right
when its error against the exact oracle is at most FACTOR times the error that a
plain computation of lower precision makes on the same inputs, plus a floor of
ULPS units of the output dtype's eps (for outputs the plain computation gets exactly
right). The floor stays a few ulps: a wide one lets a missing term through.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TOL_FACTOR", "TOL_ULPS", "tolerance", "compare", "assert_close"]

TOL_FACTOR = 3.0
TOL_ULPS = 4


def tolerance(ref: Tensor, baseline: Tensor, dtype: torch.dtype, *, factor: float = TOL_FACTOR,
              ulps: float = TOL_ULPS) -> float:
    """Allowed max abs error of a result of ``dtype`` against ``ref`` (the exact
    oracle: fp64 in the tests, the fp32 reference in the benchmark), given
    ``baseline``, the plain computation of lower precision on the same inputs (the fp32
    reference in the tests, the same-dtype per-user loop in the benchmark)."""
    if ref.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    base_err = float((baseline.detach().double() - ref).abs().max())
    return factor * base_err + ulps * torch.finfo(dtype).eps * max(float(ref.abs().max()), 1.0)


def compare(name: str, out: Tensor, ref: Tensor, baseline: Tensor, *, dtype: Optional[torch.dtype] = None,
            factor: float = TOL_FACTOR, ulps: float = TOL_ULPS):
    """(ok, err, tol, message) of ``out`` against ``ref`` under :func:`tolerance`.

    ``dtype`` is the precision the result was computed in (default: ``out.dtype``)."""
    if tuple(out.shape) != tuple(ref.shape):
        return False, float("nan"), float("nan"), f"{name}: shape {list(out.shape)} != {list(ref.shape)}"
    if ref.numel() == 0:
        return True, 0.0, 0.0, ""
    tol = tolerance(ref, baseline, dtype or out.dtype, factor=factor, ulps=ulps)
    err = float((out.detach().double() - ref.detach().double()).abs().max())
    if not math.isfinite(err) or err > tol:
        return False, err, tol, f"{name}: max err {err:.3g} > tol {tol:.3g}"
    return True, err, tol, ""


def assert_close(name: str, out: Tensor, ref: Tensor, baseline: Tensor, *, dtype: Optional[torch.dtype] = None,
                 factor: float = TOL_FACTOR, ulps: float = TOL_ULPS) -> None:
    """Raise AssertionError naming ``name`` when :func:`compare` fails."""
    ok, _, _, msg = compare(name, out, ref, baseline, dtype=dtype, factor=factor, ulps=ulps)
    assert ok, msg

