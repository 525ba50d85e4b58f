"""Argument checking for :func:`proper_kernels.lora_mixture`.

Every check raises before any compute, with a message that names the argument and
the expected shape, dtype or range. The result is a :class:`MixtureSpec` holding the
sizes every backend needs.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from ..reference.adapters import Adapters
from .plan import RoutingPlan

__all__ = ["MixtureSpec", "check_mixture_args", "check_and_sign"]


@dataclass(frozen=True)
class MixtureSpec:
    T: int  # tokens (leading dims of x flattened)
    d_in: int
    d_out: int
    K: int  # experts (0 = none)
    r: int  # expert rank (0 = none)
    N: Optional[int]  # users in the bank (None when no user-indexed tensor is given)
    r_u: int  # user rank (0 = none)
    top_k: Optional[int]
    has_weight: bool
    has_bias: bool
    has_experts: bool
    has_router: bool
    has_user_bias: bool
    has_user_lora: bool
    has_user_router: bool


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D with shape {shape_doc}, got shape {_shape(t)}")


def _dim(name: str, t: Tensor, i: int, expected: int, what: str, shape_doc: str) -> None:
    if t.shape[i] != expected:
        raise ValueError(
            f"{name} must have shape {shape_doc}: dim {i} ({what}) should be {expected}, "
            f"got shape {_shape(t)}"
        )


# The argument signatures seen (shapes, dtypes, devices; the plan's sizes) -> (their
# spec, a dict the dispatch keeps its decisions for them in): a call with a known
# signature skips the checks that read only those, and runs the ones that read values
# (the ids against the plan, or their range).
_SPECS: Dict[tuple, tuple] = {}
_SPECS_MAX = 1024


def _signature(x, weight, bias, adapters: Adapters, user_ids, plan) -> Optional[tuple]:
    """Everything the shape checks read, or None when some argument is not of a type
    they accept (the full checks then run, and raise). Only signatures that passed the
    full checks are remembered, so another type that happens to sign alike never hits."""
    if type(adapters) is not Adapters or torch.compiler.is_compiling() or (
            plan is not None and type(plan) is not RoutingPlan):
        return None
    try:
        sig = [None if t is None else (t.shape, t.dtype, t.device)
               for t in (*adapters[:7], x, weight, bias, user_ids)]
    except AttributeError:
        return None
    sig += [type(adapters.expert_scale), type(adapters.user_scale), type(adapters.top_k), adapters.top_k,
            None if plan is None else (plan.num_tokens, plan.num_users, plan.device)]
    return tuple(sig)


def check_mixture_args(x, weight, bias, adapters: Adapters, user_ids=None, plan=None) -> MixtureSpec:
    """Validate the arguments of lora_mixture; return the sizes. See the op's docstring."""
    return check_and_sign(x, weight, bias, adapters, user_ids, plan)[0]


def check_and_sign(x, weight, bias, adapters: Adapters, user_ids=None, plan=None):
    """(spec, memo): :func:`check_mixture_args`, and a dict kept for the signature of
    the arguments it checked (their shapes, dtypes and devices), where the dispatch
    remembers its decisions; None where no signature is kept (arguments of other types,
    or code traced by torch.compile)."""
    sig = _signature(x, weight, bias, adapters, user_ids, plan)
    try:
        got = _SPECS.get(sig) if sig is not None else None
    except TypeError:  # an unhashable argument (top_k=[1]): no signature, the full checks say what is wrong
        sig = got = None
    if got is None:
        got = (_check_shapes(x, weight, bias, adapters, user_ids, plan), {} if sig is not None else None)
        if sig is not None:
            if len(_SPECS) >= _SPECS_MAX:
                _SPECS.clear()
            _SPECS[sig] = got
    spec = got[0]
    if plan is not None:
        if user_ids is not None:
            plan.check_ids(user_ids)
    elif user_ids is not None and spec.T > 0:
        # One host sync; a plan built once per batch carries this check for every layer.
        lo, hi = int(user_ids.min()), int(user_ids.max())
        N = spec.N
        if lo < -1 or (N is not None and hi >= N):
            rng = f"[-1, {N})" if N is not None else "[-1, inf)"
            raise ValueError(f"user_ids must lie in {rng} (N = number of users), got values in [{lo}, {hi}]")
    return got


def _check_shapes(x, weight, bias, adapters: Adapters, user_ids=None, plan=None) -> MixtureSpec:
    """The checks of check_mixture_args that read no tensor's values."""
    if not isinstance(adapters, Adapters):
        raise TypeError(f"adapters must be a proper_kernels.Adapters, got {type(adapters).__name__}")
    (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
     expert_scale, user_scale, top_k) = adapters
    for name, scale in (("expert_scale", expert_scale), ("user_scale", user_scale)):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{name} must be a real number (python float; a tensor scale would get no "
                            f"gradient), got {type(scale).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., d_in], got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor [..., d_in], got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim ([..., d_in]), got a 0-dim tensor")
    d_in = x.shape[-1]
    T = 1
    for n in x.shape[:-1]:
        T *= n

    named = {
        "weight": weight, "bias": bias, "expert_A": expert_A, "expert_B": expert_B,
        "router_weight": router_weight, "user_logit_bias": user_logit_bias,
        "user_A": user_A, "user_B": user_B, "user_router": user_router,
    }
    for name, t in named.items():
        if isinstance(t, Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share x's device")

    # Base linear.
    d_out, d_out_src = None, None  # d_out and the argument that fixed it
    if weight is not None:
        _tensor("weight", weight, 2, "[d_out, d_in]")
        _dim("weight", weight, 1, d_in, "d_in = x.shape[-1]", "[d_out, d_in]")
        d_out, d_out_src = weight.shape[0], "weight.shape[0]"
    if bias is not None:
        _tensor("bias", bias, 1, "[d_out]")
        if d_out is not None:
            _dim("bias", bias, 0, d_out, f"d_out = {d_out_src}", "[d_out]")
        d_out, d_out_src = bias.shape[0], d_out_src or "bias.shape[0]"

    # Group experts.
    if (expert_A is None) != (expert_B is None):
        raise ValueError("expert_A [K, r, d_in] and expert_B [K, d_out, r] must be given together")
    K = r = 0
    if expert_A is not None:
        _tensor("expert_A", expert_A, 3, "[K, r, d_in]")
        _tensor("expert_B", expert_B, 3, "[K, d_out, r]")
        K, r = expert_A.shape[0], expert_A.shape[1]
        if K < 1 or r < 1:
            raise ValueError(f"expert_A must have K >= 1 and r >= 1 ([K, r, d_in]), got shape {_shape(expert_A)}")
        _dim("expert_A", expert_A, 2, d_in, "d_in = x.shape[-1]", "[K, r, d_in]")
        _dim("expert_B", expert_B, 0, K, "K = expert_A.shape[0]", "[K, d_out, r]")
        _dim("expert_B", expert_B, 2, r, "r = expert_A.shape[1]", "[K, d_out, r]")
        if d_out is not None:
            _dim("expert_B", expert_B, 1, d_out, f"d_out = {d_out_src}", "[K, d_out, r]")
        d_out, d_out_src = expert_B.shape[1], d_out_src or "expert_B.shape[1]"
    if K == 0:
        for name in ("router_weight", "user_logit_bias", "user_router"):
            if named[name] is not None:
                raise ValueError(f"{name} needs experts: pass expert_A [K, r, d_in] and expert_B [K, d_out, r]")
        if top_k is not None:
            raise ValueError("top_k needs experts: pass expert_A and expert_B, or top_k=None")
    if router_weight is not None:
        _tensor("router_weight", router_weight, 2, "[K, d_in]")
        _dim("router_weight", router_weight, 0, K, "K = expert_A.shape[0]", "[K, d_in]")
        _dim("router_weight", router_weight, 1, d_in, "d_in = x.shape[-1]", "[K, d_in]")

    # User-indexed tensors.
    N = None

    def _users(name: str, t: Tensor) -> None:
        nonlocal N
        if N is not None and t.shape[0] != N:
            raise ValueError(
                f"{name} has {t.shape[0]} users (dim 0 of shape {_shape(t)}) but another user tensor has {N}"
            )
        N = t.shape[0]

    if user_logit_bias is not None:
        _tensor("user_logit_bias", user_logit_bias, 2, "[N, K]")
        _dim("user_logit_bias", user_logit_bias, 1, K, "K = expert_A.shape[0]", "[N, K]")
        _users("user_logit_bias", user_logit_bias)
    if (user_A is None) != (user_B is None):
        raise ValueError("user_A [N, r_u, d_in] and user_B [N, d_out, r_u] must be given together")
    r_u = 0
    if user_A is not None:
        _tensor("user_A", user_A, 3, "[N, r_u, d_in]")
        _tensor("user_B", user_B, 3, "[N, d_out, r_u]")
        r_u = user_A.shape[1]
        if r_u < 1:
            raise ValueError(f"user_A must have r_u >= 1 ([N, r_u, d_in]), got shape {_shape(user_A)}")
        _dim("user_A", user_A, 2, d_in, "d_in = x.shape[-1]", "[N, r_u, d_in]")
        _users("user_A", user_A)
        _users("user_B", user_B)
        _dim("user_B", user_B, 2, r_u, "r_u = user_A.shape[1]", "[N, d_out, r_u]")
        if d_out is not None:
            _dim("user_B", user_B, 1, d_out, f"d_out = {d_out_src}", "[N, d_out, r_u]")
        d_out = user_B.shape[1]
    if user_router is not None:
        if user_A is None:
            raise ValueError("user_router [N, K, r_u] reads the user code A_u x: pass user_A and user_B too")
        _tensor("user_router", user_router, 3, "[N, K, r_u]")
        _users("user_router", user_router)
        _dim("user_router", user_router, 1, K, "K = expert_A.shape[0]", "[N, K, r_u]")
        _dim("user_router", user_router, 2, r_u, "r_u = user_A.shape[1]", "[N, K, r_u]")

    if d_out is None:
        raise ValueError("the output size is undefined: pass weight, bias, experts or user adapters")

    if N is not None and user_ids is None and plan is None:
        raise ValueError("user-indexed tensors were given (user_A/user_B/user_logit_bias/user_router): pass user_ids")
    if user_ids is not None:
        if not isinstance(user_ids, Tensor):
            raise TypeError(f"user_ids must be an integer torch.Tensor of shape {list(x.shape[:-1])}, got {type(user_ids).__name__}")
        if user_ids.dtype.is_floating_point or user_ids.dtype.is_complex or user_ids.dtype == torch.bool:
            raise TypeError(f"user_ids must be an integer tensor, got dtype {user_ids.dtype}")
        if tuple(user_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"user_ids must have shape {list(x.shape[:-1])} (x's leading dims), got {list(user_ids.shape)}"
            )
        if user_ids.device != x.device:
            raise ValueError(f"user_ids is on {user_ids.device} but x is on {x.device}")
    if plan is not None:
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a RoutingPlan built by pk.plan(user_ids, num_users), "
                            f"got {type(plan).__name__}")
        if plan.num_tokens != T:
            raise ValueError(f"plan was built for {plan.num_tokens} tokens but x has {T}")
        if N is not None and plan.num_users != N:
            raise ValueError(f"plan was built for num_users={plan.num_users} but the user tensors have N={N}")
        if plan.device != x.device:
            raise ValueError(f"plan is on {plan.device} but x is on {x.device}")

    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= K:
            raise ValueError(f"top_k must be an int in [1, K={K}] or None, got {top_k!r}")

    return MixtureSpec(
        T=T, d_in=d_in, d_out=d_out, K=K, r=r, N=N, r_u=r_u, top_k=top_k,
        has_weight=weight is not None, has_bias=bias is not None, has_experts=K > 0,
        has_router=router_weight is not None, has_user_bias=user_logit_bias is not None,
        has_user_lora=user_A is not None, has_user_router=user_router is not None,
    )
