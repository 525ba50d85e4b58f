"""The public functional op ``proper_kernels.lora_mixture``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.adapters import Adapters
from ..reference.mixture import lora_mixture_ref
from . import cuda_decode
from .dispatch import choose_path_cached
from .plan import RoutingPlan
from .torch_backend import lora_mixture_torch
from .validate import check_and_sign

__all__ = ["lora_mixture"]


def lora_mixture(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    *,
    expert_A: Optional[Tensor] = None, expert_B: Optional[Tensor] = None, expert_scale: float = 1.0,
    router_weight: Optional[Tensor] = None, user_ids: Optional[Tensor] = None,
    user_logit_bias: Optional[Tensor] = None, user_A: Optional[Tensor] = None, user_B: Optional[Tensor] = None,
    user_scale: float = 1.0, user_router: Optional[Tensor] = None, top_k: Optional[int] = None,
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
        backend:         "auto", "reference", "torch", "triton" or "cuda"; None (default) reads
                         $PROPER_KERNELS_BACKEND, else "auto". Which path runs and why:
                         :func:`proper_kernels.explain` with the same arguments.

    Returns:
        y [..., d_out] in x.dtype, or (y, gates) when return_gates. The compute dtype
        follows x alone: float32 (float64 when x is float64). Parameters may have any
        floating dtype, also one other than x's; they are converted to the compute
        dtype, and each gradient comes back in its own tensor's dtype. With experts but
        no router input the gates are uniform, 1/K. Differentiable in every tensor.
    """
    adapters = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                        expert_scale, user_scale, top_k)
    spec, memo = check_and_sign(x, weight, bias, adapters, user_ids, plan)
    if type(expert_scale) is not float or type(user_scale) is not float or top_k is not None:
        adapters = adapters._replace(expert_scale=float(expert_scale), user_scale=float(user_scale),
                                     top_k=top_k if (top_k is not None and top_k < spec.K) else None)
    lead = tuple(x.shape[:-1])
    x2 = x if x.dim() == 2 else x.reshape(spec.T, spec.d_in)
    # The plan, when given, is the routing of the batch: every backend reads its ids.
    ids = plan.user_ids if plan is not None else (user_ids.reshape(spec.T) if user_ids is not None else None)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for t in (weight, bias, *adapters[:7])))
    path = choose_path_cached(memo, x, weight, bias, adapters, spec, ids, backend, grad)
    if path.backend == "base":
        y = F.linear(x, weight, bias)
        return (y, None) if return_gates else y
    if path.backend == "reference":
        y, gates = lora_mixture_ref(x2, weight, bias, adapters, ids, d_out=spec.d_out)
    elif path.backend == "torch":
        y, gates = lora_mixture_torch(x2, weight, bias, adapters, ids, d_out=spec.d_out, num_users=spec.N, plan=plan,
                                      variant=path.forward, gates=return_gates, needs_grad=grad)
    elif path.backend == "triton":
        from .autograd import lora_mixture_fused

        if plan is None and ids is not None and spec.N is not None:
            plan = RoutingPlan(ids, spec.N, check=False)  # ids were range-checked above
        y, gates = lora_mixture_fused(x2, weight, bias, adapters, spec=spec, plan=plan, impl=path.forward)
    else:  # the arguments and the kernel's limits were checked above
        y, gates = cuda_decode.decode_checked(x2, weight, bias, adapters, spec, ids, return_gates=True)
    if x.dim() != 2:
        y = y.reshape(*lead, spec.d_out)
    if not return_gates:
        return y
    if gates is not None:
        gates = gates.reshape(*lead, spec.K)
    return y, gates
