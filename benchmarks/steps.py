"""The inputs of a benchmark case and the step a provider runs on them.

A case's inputs are one or more adapted linears (one per projection: one for
``fwd``/``fwdbwd``/``decode``, gate/up/down for ``mlp``) drawn by
``proper_kernels.testing.make_mixture_inputs``, the batch x and its user ids, their
routing plan, and for training the output gradient dy. A step is the callable that
gets timed: the forward under ``no_grad``, or the forward and ``autograd.grad`` of x
and every adapter/router tensor. The reference check runs the same steps.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from presets import Case
from providers import GRAD_PARAMS, strip_params

MLP_PROJECTIONS = ("gate", "up", "down")


def make_layers(case: Case, dtype: torch.dtype, device: torch.device, seed: int):
    """(layers: list of parameter dicts, x, user_ids, plan, dy) for a case."""
    from proper_kernels import plan as make_plan
    from proper_kernels.testing import make_mixture_inputs

    if case.op == "mlp":
        shapes = [(case.d_in, case.d_ff), (case.d_in, case.d_ff), (case.d_ff, case.d_in)]
    else:
        shapes = [(case.d_in, case.d_out)]
    layers = []
    first = None
    for i, (d_in, d_out) in enumerate(shapes):
        inp = make_mixture_inputs(case.T, d_in, d_out, K=case.K, r=case.r, r_u=case.r_u, N=case.N, law=case.law,
                                  dtype=dtype, device=device, seed=seed * 1000 + case.index * 10 + i)
        if first is None:
            first = inp
        layers.append({k: v for k, v in inp.items() if k not in ("x", "user_ids")})
    x, ids = first["x"], first["user_ids"]
    pl = make_plan(ids, case.N)
    g = torch.Generator().manual_seed(seed + 7)
    d_final = shapes[-1][1]
    dy = torch.randn(case.T, d_final, generator=g).to(device=device, dtype=dtype) if case.grad else None
    return layers, x, ids, pl, dy


def to_dtype(layers: List[Dict[str, object]], dtype: torch.dtype) -> List[Dict[str, object]]:
    return [{k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in p.items()} for p in layers]


def make_step(case: Case, provider, layers, x, ids, pl, dy, *, work: Optional[str] = None):
    """The timed callable: forward (no grad), or forward + autograd.grad of every
    adapter/router tensor and x. Returns a tuple of tensors (y, grads...) in the order
    of :func:`output_names`. ``work`` ("full", "users", "base"; default the provider's)
    is the part of the parameters the provider gets."""
    layers = [strip_params(p, work or provider.work) for p in layers]
    if not case.grad:
        fn = provider.compose(case, layers, ids, pl)

        def step():
            with torch.no_grad():
                return (fn(x),)
        return step
    x_leaf = x.detach().requires_grad_(True)
    leaves = [{k: (v.detach().requires_grad_(True) if k in GRAD_PARAMS and isinstance(v, torch.Tensor) else v)
               for k, v in p.items()} for p in layers]
    fn = provider.compose(case, leaves, ids, pl)
    wrt = [x_leaf] + [p[k] for p in leaves for k in GRAD_PARAMS if isinstance(p[k], torch.Tensor)]

    def step():
        y = fn(x_leaf)
        return (y,) + tuple(torch.autograd.grad(y, wrt, dy))
    return step


def output_names(case: Case, layers, work: str) -> List[str]:
    """Names of the tensors a step returns: y, then dx and d<param>[projection] in training."""
    names = ["y"]
    if case.grad:
        names.append("dx")
        for i, p in enumerate(strip_params(q, work) for q in layers):
            for k in GRAD_PARAMS:
                if isinstance(p[k], torch.Tensor):
                    names.append(f"d{k}" + (f"[{MLP_PROJECTIONS[i]}]" if case.op == "mlp" else ""))
    return names
