"""The custom ops of the fused mixture and its autograd Function.

Two ``torch.library`` custom ops carry the whole layer:

* ``proper_kernels::mixture_fwd``  x, params, plan tensors -> (y, h, z, g)
* ``proper_kernels::mixture_bwd``  dy, x, h, z, g, params   -> every gradient

Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a
model that calls them, and :class:`LoraMixtureFunction` ties them together for
autograd. They run the Triton launchers of ``proper_kernels.triton``; the forward op
runs the rank-space torch contract (``proper_kernels.reference.rankspace``) instead
when the dispatch (``proper_kernels.ops.dispatch``) says so (``impl="torch"``: a
dtype without forward kernels). The ops take the adapter tensors flat, in
:data:`~proper_kernels.reference.adapters.ADAPTER_TENSORS` order, because a custom
op's schema has no room for a tuple of optional tensors.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype
from ..reference.rankspace import mixture_fwd_ref
from .plan import RoutingPlan
from .validate import MixtureSpec

__all__ = ["lora_mixture_fused", "LoraMixtureFunction"]

_NUM_GRADS = 10  # dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV
FORWARD_IMPLS = ("triton", "torch")


def _nvtx(name: str):
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


@torch.library.custom_op("proper_kernels::mixture_fwd", mutates_args=())
def mixture_fwd_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    # the adapter tensors, in ADAPTER_TENSORS order
    expert_A: Optional[Tensor], expert_B: Optional[Tensor], router_weight: Optional[Tensor],
    user_logit_bias: Optional[Tensor], user_A: Optional[Tensor], user_B: Optional[Tensor],
    user_router: Optional[Tensor], user_ids: Optional[Tensor], order: Optional[Tensor],
    expert_scale: float, user_scale: float, top_k: int, d_out: int, impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [T, d_out] x.dtype, h [T, K r], z [T, r_u], g [T, K]; codes in the compute
    dtype); top_k=0: dense; impl "triton" (kernels) or "torch" (rank-space contract)."""
    adapters = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                        expert_scale, user_scale, top_k if top_k > 0 else None)
    with _nvtx("proper_kernels::mixture_fwd"):
        if impl == "triton":
            from ..triton.mixture_fwd import mixture_fwd

            return mixture_fwd(x, weight, bias, adapters, user_ids, order, d_out)
        return mixture_fwd_ref(x, weight, bias, adapters, user_ids, d_out)


@mixture_fwd_op.register_fake
def _(x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
      user_ids, order, expert_scale, user_scale, top_k, d_out, impl):
    T = x.shape[0]
    cd = compute_dtype(x.dtype)
    K, r = (expert_A.shape[0], expert_A.shape[1]) if expert_A is not None else (0, 0)
    r_u = user_A.shape[1] if user_A is not None else 0
    return (x.new_empty(T, d_out), x.new_empty(T, K * r, dtype=cd), x.new_empty(T, r_u, dtype=cd),
            x.new_empty(T, K, dtype=cd))


@torch.library.custom_op("proper_kernels::mixture_bwd", mutates_args=())
def mixture_bwd_op(
    dy: Tensor,
    x: Tensor,
    h: Tensor,
    z: Tensor,
    g: Tensor,
    dg: Optional[Tensor],
    weight: Optional[Tensor],
    expert_A: Optional[Tensor],
    expert_B: Optional[Tensor],
    router_weight: Optional[Tensor],
    user_A: Optional[Tensor],
    user_B: Optional[Tensor],
    user_router: Optional[Tensor],
    order: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    expert_scale: float,
    user_scale: float,
    needs: List[bool],
) -> List[Tensor]:
    """The 10 gradients (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV): dx in
    x.dtype (its only consumer casts it there anyway; the kernel writes it once, with
    no [T, d_in] fp32 temporary), the others in the compute dtype; an entry not needed
    (or whose parameter is absent) is an empty tensor of shape [0]. ``dg`` [T, K] is
    the gradient that reaches the gates directly (None when they were not used)."""
    from ..triton.mixture_bwd import mixture_bwd

    adapters = Adapters(expert_A, expert_B, router_weight, None, user_A, user_B, user_router,
                        expert_scale, user_scale)
    with _nvtx("proper_kernels::mixture_bwd"):
        grads = mixture_bwd(dy, x, h, z, g, weight, adapters, order, seg_offsets, tuple(needs),
                            dx_dtype=x.dtype, dg_ext=dg)
    # One fresh empty per absent entry: a custom op's outputs may not alias each other.
    cd = compute_dtype(x.dtype)
    out = [gr.contiguous() if gr is not None else x.new_empty(0, dtype=cd) for gr in grads]
    out[0] = out[0].to(x.dtype)
    return out


def _grad_shapes(x, weight, expert_A, router_weight, user_A, user_B, user_router, d_out, N, K):
    """Shapes of the 10 gradients (None: the layer has no such gradient)."""
    has_e = expert_A is not None
    return [
        tuple(x.shape),
        tuple(weight.shape) if weight is not None else None,
        (d_out,),
        tuple(expert_A.shape) if has_e else None,
        (K, d_out, expert_A.shape[1]) if has_e else None,
        tuple(router_weight.shape) if router_weight is not None else None,
        (N, K) if (has_e and N is not None) else None,
        tuple(user_A.shape) if user_A is not None else None,
        tuple(user_B.shape) if user_A is not None else None,
        tuple(user_router.shape) if user_router is not None else None,
    ]


@mixture_bwd_op.register_fake
def _(dy, x, h, z, g, dg, weight, expert_A, expert_B, router_weight, user_A, user_B, user_router,
      order, seg_offsets, expert_scale, user_scale, needs):
    cd = compute_dtype(x.dtype)
    N = seg_offsets.shape[0] - 2 if seg_offsets is not None else None
    shapes = _grad_shapes(x, weight, expert_A, router_weight, user_A, user_B, user_router, dy.shape[1], N, g.shape[1])
    return [x.new_empty(shape if (need and shape is not None) else (0,), dtype=x.dtype if i == 0 else cd)
            for i, (need, shape) in enumerate(zip(needs, shapes))]


class LoraMixtureFunction(torch.autograd.Function):
    """Autograd of the fused mixture: the forward saves only x and the rank-space
    codes (h, z, g); the backward rebuilds every gradient from them by the chain rule
    written in ``proper_kernels.reference.rankspace`` (the kernels' contract).

    dx includes W0^T dy even when W0 is frozen. The per-user bias c = W_e E^T is an
    input like any other, so dE and dW_e follow from dc through autograd outside this
    Function. Inputs with requires_grad False are skipped in the backward (their flag
    is off in ``needs``). The gates stay differentiable: their gradient (e.g. from the
    balance loss) joins dg before the softmax backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias,
                user_A, user_B, user_router, user_ids, order, seg_offsets,
                expert_scale, user_scale, top_k, d_out, impl):
        y, h, z, g = mixture_fwd_op(
            x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
            user_ids, order, expert_scale, user_scale, top_k, d_out, impl,
        )
        ctx.save_for_backward(x, h, z, g, weight, expert_A, expert_B, router_weight,
                              user_A, user_B, user_router, order, seg_offsets)
        ctx.scales = (expert_scale, user_scale)
        params = (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router)
        ctx.dtypes = [p.dtype if p is not None else None for p in params]
        ctx.y_meta = (y.shape, y.dtype)
        # Unused outputs arrive as None in the backward.
        ctx.set_materialize_grads(False)
        return y, g

    @staticmethod
    def backward(ctx, dy, dg):
        (x, h, z, g, weight, expert_A, expert_B, router_weight,
         user_A, user_B, user_router, order, seg_offsets) = ctx.saved_tensors
        # forward's first 10 arguments and the op's 10 gradients share one order:
        # x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router.
        needs = list(ctx.needs_input_grad[:_NUM_GRADS])
        n_args = 18
        if not any(needs) or (dy is None and (dg is None or g.numel() == 0)):
            return (None,) * n_args
        if dy is None:  # only the gates were used
            dy = x.new_zeros(ctx.y_meta[0], dtype=ctx.y_meta[1])
        dg = dg.contiguous() if (dg is not None and g.numel() > 0) else None
        grads = mixture_bwd_op(
            dy.contiguous(), x, h, z, g, dg, weight, expert_A, expert_B, router_weight,
            user_A, user_B, user_router, order, seg_offsets, ctx.scales[0], ctx.scales[1], needs,
        )
        out = [gr.to(dt) if need and gr.numel() > 0 else None
               for need, gr, dt in zip(needs, grads, ctx.dtypes)]
        return (*out,) + (None,) * (n_args - _NUM_GRADS)


def lora_mixture_fused(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Adapters, *,
                       spec: MixtureSpec, plan: Optional[RoutingPlan], impl: str = "triton"):
    """The kernel path of ``lora_mixture`` on validated 2-D inputs; returns (y, gates).

    ``plan`` is None only when no tensor is indexed by user (the ids then do not
    matter); ``impl`` is the dispatch's forward implementation ("triton" or "torch").
    """
    user_ids, order, seg_offsets = (plan.user_ids, plan.order, plan.seg_offsets) if plan is not None else (None,) * 3
    y, g = LoraMixtureFunction.apply(
        x.contiguous(), weight, bias, *adapters.tensors(), user_ids, order, seg_offsets,
        float(adapters.expert_scale), float(adapters.user_scale), int(adapters.top_k or 0), int(spec.d_out), impl,
    )
    return y, (g if spec.has_experts else None)
