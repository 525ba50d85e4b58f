"""The reference check that every provider passes before it is timed.

The oracle of a case is the fp32 reference (provider ``reference`` on fp32 copies of
the inputs); the baseline is the same computation in plain PyTorch in the benchmark
dtype (provider ``loop``). A provider's output tensors (y, and in training every
gradient) are compared by the package's one tolerance rule,
``proper_kernels.testing.compare``: max|out - ref| <= TOL_FACTOR x max|loop - ref| +
TOL_ULPS eps(dtype) max(|ref|, 1). The floor stays a few ulps, so a provider that
leaves out a term of the mixture fails in bfloat16.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from providers import REGISTRY
from steps import make_step, to_dtype

from proper_kernels.testing import TOL_FACTOR, TOL_ULPS, compare

RULE = f"fp32 reference; tol = {TOL_FACTOR:g}x the same-dtype loop's error + {TOL_ULPS} eps max(|ref|, 1)"


class Oracle:
    """The fp32 reference outputs of one case and the same-dtype ``loop`` outputs
    (the baseline of the tolerance), per kind of work ("full", "users", "base"),
    computed once and shared by every provider of the case."""

    def __init__(self, case, layers, x, ids, pl, dy):
        self.case, self.layers, self.x, self.ids, self.pl, self.dy = case, layers, x, ids, pl, dy
        self._cache: Dict[str, Tuple[List[Tensor], List[Tensor]]] = {}

    def outputs(self, work: str) -> Tuple[List[Tensor], List[Tensor]]:
        """(fp32 reference outputs, same-dtype loop outputs) of ``work``."""
        if work not in self._cache:
            f32 = torch.float32
            dy32 = self.dy.to(f32) if self.dy is not None else None
            ref = make_step(self.case, REGISTRY["reference"], to_dtype(self.layers, f32), self.x.to(f32), self.ids,
                            self.pl, dy32, work=work)()
            base = make_step(self.case, REGISTRY["loop"], self.layers, self.x, self.ids, self.pl, self.dy,
                             work=work)()
            self._cache[work] = ([t.detach().float() for t in ref], [t.detach() for t in base])
        return self._cache[work]

    def check(self, work: str, out: Sequence[Tensor], names: Sequence[str], dtype: torch.dtype):
        """(ok, err, tol, message): err and tol of the output nearest its tolerance
        when all pass, of the first failing output otherwise."""
        ref_out, base_out = self.outputs(work)
        if len(out) != len(ref_out):
            return False, float("nan"), float("nan"), f"{len(out)} outputs, expected {len(ref_out)}"
        worst = (0.0, 0.0)
        for name, o, r, b in zip(names, out, ref_out, base_out):
            ok, err, tol, msg = compare(name, o, r, b, dtype=dtype)
            if not ok:
                return False, err, tol, msg
            if tol and (not worst[1] or err / tol >= worst[0] / worst[1]):
                worst = (err, tol)
        return True, worst[0], worst[1], ""
