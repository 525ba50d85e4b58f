"""The public functional op ``proper_kernels.lora_mixture`` and its backend dispatch."""
from __future__ import annotations

import importlib
import numbers
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.mixture import lora_mixture_ref
from ..triton.target import interpreter_problem
from . import cuda_decode
from .plan import RoutingPlan
from .validate import MixtureSpec, check_mixture_args

__all__ = ["lora_mixture", "available_backends", "choose_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "cuda")
# Read once: torch.compile traces the dispatch, and a constant is all it needs to see.
_INTERPRETER_PROBLEM: Optional[str] = interpreter_problem()


def _module(name: str):
    # sys.modules first: torch.compile traces a dict lookup but not importlib.
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _triton_usable(device: torch.device) -> bool:
    if _module("triton") is None or _module("proper_kernels.ops.fused") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1" and _INTERPRETER_PROBLEM is None


def _interpreter_unsupported(device: torch.device, tensors) -> Optional[str]:
    """Why the Triton CPU interpreter cannot run these tensors, or None.

    Its ``tl.dot`` returns garbage for bfloat16 operands (triton 3.x; magnitudes
    around 1e10 instead of O(1)), in the forward and in the backward, so a bfloat16
    tensor must never reach the kernels there. Compiled kernels on CUDA are fine.
    """
    if device.type != "cpu":
        return None
    if any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        return "the Triton CPU interpreter computes tl.dot wrongly for bfloat16 (use float16/float32)"
    return None


def _cuda_usable(device: torch.device) -> bool:
    mod = _module("proper_kernels.ops.cuda_decode")
    return device.type == "cuda" and mod is not None and mod.available()


def available_backends(device: torch.device | str = "cpu") -> list:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if _triton_usable(device):
        out.append("triton")
    if _cuda_usable(device):
        out.append("cuda")
    return out


def _base_only(x: Tensor, weight, bias, tensors) -> bool:
    """No adapter tensor, and W0 (and b) in x's dtype: y = x W0^T + b is all there is."""
    return (weight is not None and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and all(t is None for t in tensors[3:]))


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _requested_backend(requested: Optional[str]) -> str:
    """The backend asked for: ``requested``, else $PROPER_KERNELS_BACKEND, else "auto"; checked."""
    if requested:
        source = "backend"
    else:
        requested = os.environ.get("PROPER_KERNELS_BACKEND") or "auto"
        source = "backend (from $PROPER_KERNELS_BACKEND)"
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    return requested


def choose_backend(x: Tensor, spec: MixtureSpec, requested: Optional[str], tensors=()) -> str:
    """The one place that picks a backend.

    ``requested=None`` reads the environment variable PROPER_KERNELS_BACKEND (one of
    BACKENDS), else "auto". ``auto``: the CUDA decode kernel for small inference batches on CUDA (its token
    threshold is kept in ``proper_kernels.ops.cuda_decode``), Triton on CUDA (and on
    CPU under TRITON_INTERPRET=1, except for bfloat16 tensors, which the interpreter
    gets wrong), the reference otherwise.
    """
    requested = _requested_backend(requested)
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not _triton_usable(x.device):
            why = _INTERPRETER_PROBLEM if x.device.type == "cpu" else None
            raise RuntimeError(
                f"backend='triton' is not usable on {x.device}: it needs triton and a CUDA device "
                "(or TRITON_INTERPRET=1 on CPU)" + (f"; here {why}" if why else "")
            )
        why = _interpreter_unsupported(x.device, tensors)
        if why is not None:
            raise RuntimeError(f"backend='triton' cannot run these inputs on {x.device}: {why}, "
                               "or backend='reference'")
        return "triton"
    if requested == "cuda":
        if not _cuda_usable(x.device):
            raise RuntimeError(f"backend='cuda' is not usable on {x.device}: it needs the built proper_kernels._C extension and a CUDA tensor")
        if _needs_grad(tensors):
            raise RuntimeError("backend='cuda' is forward-only (decode): run it under torch.no_grad() or use 'triton'")
        return "cuda"
    # auto
    if _cuda_usable(x.device) and not _needs_grad(tensors):
        mod = _module("proper_kernels.ops.cuda_decode")
        if spec.T <= mod.decode_threshold(x.device, x.dtype):
            return "cuda"
    if _triton_usable(x.device) and _interpreter_unsupported(x.device, tensors) is None:
        return "triton"
    return "reference"


def lora_mixture(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    *,
    expert_A: Optional[Tensor] = None,
    expert_B: Optional[Tensor] = None,
    expert_scale: float = 1.0,
    router_weight: Optional[Tensor] = None,
    user_ids: Optional[Tensor] = None,
    user_logit_bias: Optional[Tensor] = None,
    user_A: Optional[Tensor] = None,
    user_B: Optional[Tensor] = None,
    user_scale: float = 1.0,
    user_router: Optional[Tensor] = None,
    top_k: Optional[int] = None,
    plan: Optional[RoutingPlan] = None,
    return_gates: bool = False,
    backend: Optional[str] = None,
):
    """One PROPER-adapted linear over a mixed-user batch.

    Per token t of user u = user_ids[t] (u = -1: every user term is zero)::

        z_t = A_u x_t                              user code            [r_u]
        l_t = W_r x_t + c_u + V_u z_t              gate logits          [K]
        g_t = softmax(l_t)                         (top_k: over the top_k logits only)
        y_t = W0 x_t + b + s_g sum_k g_tk B_k A_k x_t + s_u B_u z_t

    Args:
        x:               [..., d_in] float.
        weight:          W0 [d_out, d_in] or None (then y is the adapters' delta + b).
        bias:            b [d_out] or None.
        expert_A:        A_g [K, r, d_in]; expert_B: B_g [K, d_out, r]; expert_scale: s_g.
        router_weight:   W_r [K, d_in] (user-aware router, token part).
        user_ids:        int [...] matching x's leading dims, values in [-1, N).
        user_logit_bias: c [N, K] (= W_e E^T, the user part of the router).
        user_A:          A_u [N, r_u, d_in]; user_B: B_u [N, d_out, r_u]; user_scale: s_u.
        user_router:     V [N, K, r_u] (LoRA-aware router).
        top_k:           None (dense softmax) or an int in [1, K].
        plan:            a :class:`RoutingPlan` of user_ids, built once per batch and
                         shared by all layers (built here when omitted). When both are
                         given the plan's ids are used (its range was checked once).
        return_gates:    also return the gates g [..., K] (in the compute dtype: float32,
                         float64 for float64 x; None without experts).
        backend:         "auto", "reference", "triton" or "cuda"; None (default) reads
                         $PROPER_KERNELS_BACKEND, else "auto".

    Returns:
        y [..., d_out] in x.dtype, or (y, gates) when return_gates. The compute dtype
        follows x alone: float32 (float64 when x is float64). Parameters may have any
        floating dtype, also one other than x's; they are converted to the compute
        dtype, and each gradient comes back in its own tensor's dtype. With experts but
        no router input the gates are uniform, 1/K. Differentiable in every tensor.
    """
    spec = check_mixture_args(
        x, weight, bias, expert_A=expert_A, expert_B=expert_B, router_weight=router_weight,
        user_ids=user_ids, user_logit_bias=user_logit_bias, user_A=user_A, user_B=user_B,
        user_router=user_router, top_k=top_k, plan=plan,
    )
    for name, scale in (("expert_scale", expert_scale), ("user_scale", user_scale)):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{name} must be a real number (python float; a tensor scale would get no "
                            f"gradient), got {type(scale).__name__}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(spec.T, spec.d_in)
    # The plan, when given, is the routing of the batch: every backend reads its ids.
    if plan is not None:
        ids = plan.user_ids
    elif user_ids is not None:
        ids = user_ids.reshape(spec.T)
    else:
        ids = None
    if spec.top_k is not None and spec.top_k >= spec.K:
        top_k = None  # keeping all K logits is the dense softmax

    params = (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router)
    requested = _requested_backend(backend)  # checked even when T = 0 runs the reference
    if requested in ("auto", "reference") and _base_only(x, weight, bias, params):
        # Nothing to adapt (no stage on, or only a merged population): the base linear
        # itself, with no fp32 copy of W0 per call.
        y = F.linear(x, weight, bias)
        return (y, None) if return_gates else y
    which = choose_backend(x, spec, requested, params) if spec.T > 0 else "reference"
    if which == "cuda" and requested == "auto":
        # auto only: a case the decode kernel does not cover (mixed dtypes, fp64, strided
        # parameters, K > 64, ...) falls back instead of raising.
        why = cuda_decode.unsupported_reason(
            x2, weight, bias, expert_A=expert_A, expert_B=expert_B, router_weight=router_weight,
            user_ids=ids, user_logit_bias=user_logit_bias, user_A=user_A, user_B=user_B, user_router=user_router)
        if why is not None:
            which = "triton" if _triton_usable(x.device) else "reference"
    kwargs = dict(
        expert_A=expert_A, expert_B=expert_B, expert_scale=float(expert_scale),
        router_weight=router_weight, user_ids=ids, user_logit_bias=user_logit_bias,
        user_A=user_A, user_B=user_B, user_scale=float(user_scale), user_router=user_router,
        top_k=top_k,
    )
    if which == "reference":
        y, gates = lora_mixture_ref(x2, weight, bias, d_out=spec.d_out, **kwargs)
    elif which == "triton":
        from .fused import lora_mixture_fused

        if plan is None and ids is not None and spec.N is not None:
            plan = RoutingPlan(ids, spec.N, check=False)  # ids were range-checked above
        y, gates = lora_mixture_fused(x2, weight, bias, spec=spec, plan=plan, return_gates=return_gates, **kwargs)
    else:
        y, gates = cuda_decode.lora_mixture_decode_cuda(x2, weight, bias, return_gates=True, plan=plan, **kwargs)
    y = y.reshape(*lead, spec.d_out)
    if not return_gates:
        return y
    if gates is not None:
        gates = gates.reshape(*lead, spec.K)
    return y, gates
