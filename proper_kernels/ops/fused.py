"""Custom ops and the autograd Function of the fused mixture.

Two ``torch.library`` custom ops carry the whole layer:

* ``proper_kernels::mixture_fwd``  x, params, plan tensors -> (y, h, z, g)
* ``proper_kernels::mixture_bwd``  dy, x, h, z, g, params   -> every gradient

Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a
model that calls them, and :class:`LoraMixtureFunction` ties them together for
autograd. Where the kernels run (CUDA, or CPU with TRITON_INTERPRET=1) the ops call
the Triton launchers of ``proper_kernels.triton``; elsewhere they run the rank-space
reference (``proper_kernels.reference.rankspace``), the same math in torch.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..reference.mixture import compute_dtype
from ..reference.rankspace import mixture_bwd_ref, mixture_fwd_ref
from .plan import RoutingPlan
from .validate import MixtureSpec

__all__ = ["lora_mixture_fused", "LoraMixtureFunction"]

_NUM_GRADS = 10  # dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV


def _use_triton(x: Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _nvtx(name: str):
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    import contextlib

    return contextlib.nullcontext()


@torch.library.custom_op("proper_kernels::mixture_fwd", mutates_args=())
def mixture_fwd_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    expert_A: Optional[Tensor],
    expert_B: Optional[Tensor],
    router_weight: Optional[Tensor],
    user_ids: Optional[Tensor],
    order: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    user_logit_bias: Optional[Tensor],
    user_A: Optional[Tensor],
    user_B: Optional[Tensor],
    user_router: Optional[Tensor],
    expert_scale: float,
    user_scale: float,
    top_k: int,
    d_out: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [T, d_out] x.dtype, h [T, K r] fp32, z [T, r_u] fp32, g [T, K] fp32); top_k=0: dense."""
    tk = top_k if top_k > 0 else None
    with _nvtx("proper_kernels::mixture_fwd"):
        if _use_triton(x):
            from ..triton.mixture_fwd import mixture_fwd

            return mixture_fwd(
                x, weight, bias, expert_A, expert_B, router_weight, user_ids, order, seg_offsets,
                user_logit_bias, user_A, user_B, user_router, expert_scale, user_scale, tk, d_out,
            )
        return mixture_fwd_ref(
            x, weight, bias, expert_A, expert_B, router_weight, user_ids, user_logit_bias,
            user_A, user_B, user_router, expert_scale, user_scale, tk, d_out,
        )


@mixture_fwd_op.register_fake
def _(x, weight, bias, expert_A, expert_B, router_weight, user_ids, order, seg_offsets,
      user_logit_bias, user_A, user_B, user_router, expert_scale, user_scale, top_k, d_out):
    T = x.shape[0]
    cd = compute_dtype(x.dtype)
    Kr = expert_A.shape[0] * expert_A.shape[1] if expert_A is not None else 0
    K = expert_A.shape[0] if expert_A is not None else 0
    r_u = user_A.shape[1] if user_A is not None else 0
    return (
        x.new_empty(T, d_out),
        x.new_empty(T, Kr, dtype=cd),
        x.new_empty(T, r_u, dtype=cd),
        x.new_empty(T, K, dtype=cd),
    )


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
    user_ids: Optional[Tensor],
    order: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    user_A: Optional[Tensor],
    user_B: Optional[Tensor],
    user_router: Optional[Tensor],
    expert_scale: float,
    user_scale: float,
    needs: List[bool],
) -> List[Tensor]:
    """The 10 gradients (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV): dx in
    x.dtype (its only consumer casts it there anyway; the kernel writes it once, with
    no [T, d_in] fp32 temporary), the others in the compute dtype; an entry not needed
    (or whose parameter is absent) is an empty tensor of shape [0]. ``dg`` [T, K] is
    the gradient that reaches the gates directly (None when they were not used)."""
    with _nvtx("proper_kernels::mixture_bwd"):
        if _use_triton(x):
            from ..triton.mixture_bwd import mixture_bwd

            grads = mixture_bwd(
                dy, x, h, z, g, weight, expert_A, expert_B, router_weight, user_ids, order,
                seg_offsets, user_A, user_B, user_router, expert_scale, user_scale, tuple(needs),
                dx_dtype=x.dtype, dg_ext=dg,
            )
        else:
            grads = mixture_bwd_ref(
                dy, x, h, z, g, weight, expert_A, expert_B, router_weight, user_ids, user_A,
                user_B, user_router, expert_scale, user_scale, tuple(needs), dg_ext=dg,
                num_users=seg_offsets.shape[0] - 2 if seg_offsets is not None else None,
            )
    # One fresh empty per absent entry: a custom op's outputs may not alias each other.
    cd = compute_dtype(x.dtype)
    out = [gr.contiguous() if gr is not None else x.new_empty(0, dtype=cd) for gr in grads]
    out[0] = out[0].to(x.dtype)
    return out


def _grad_shapes(x, weight, expert_A, router_weight, user_A, user_B, user_router, d_out, N, K):
    """Shapes of the 10 gradients, for the fake implementation."""
    return [
        tuple(x.shape),
        tuple(weight.shape) if weight is not None else None,
        (d_out,),
        tuple(expert_A.shape) if expert_A is not None else None,
        (K, d_out, expert_A.shape[1]) if expert_A is not None else None,
        tuple(router_weight.shape) if router_weight is not None else None,
        (N, K) if N is not None else None,
        tuple(user_A.shape) if user_A is not None else None,
        tuple(user_B.shape) if user_B is not None else None,
        tuple(user_router.shape) if user_router is not None else None,
    ]


@mixture_bwd_op.register_fake
def _(dy, x, h, z, g, dg, weight, expert_A, expert_B, router_weight, user_ids, order, seg_offsets,
      user_A, user_B, user_router, expert_scale, user_scale, needs):
    cd = compute_dtype(x.dtype)
    d_out = dy.shape[1]
    K = g.shape[1]
    N = seg_offsets.shape[0] - 2 if seg_offsets is not None else None
    shapes = _grad_shapes(x, weight, expert_A, router_weight, user_A, user_B, user_router, d_out, N, K)
    out = []
    for i, (need, shape, applies) in enumerate(zip(needs, shapes, _applies(weight, expert_A, router_weight, user_A, user_router))):
        dt = x.dtype if i == 0 else cd  # dx comes back in x.dtype
        out.append(x.new_empty(shape if (need and applies and shape is not None) else (0,), dtype=dt))
    return out


def _applies(weight, expert_A, router_weight, user_A, user_router):
    """Which of the 10 gradients the layer has (the backward returns None for others)."""
    has_e = expert_A is not None
    return [True, weight is not None, True, has_e, has_e, router_weight is not None, has_e,
            user_A is not None, user_A is not None, user_router is not None]


class LoraMixtureFunction(torch.autograd.Function):
    """Autograd of the fused mixture: forward saves only x and the rank-space codes.

    Forward (per token t, u = u(t), G_t = g_t repeated r times)::

        h_t = A_cat x_t,  z_t = A_u x_t,  l_t = W_r x_t + c_u + V_u z_t,  g_t = softmax(l_t)
        y_t = W0 x_t + b + s_g B_cat (G_t * h_t) + s_u B_u z_t

    Backward (the chain rule for every input; sums over t in u run over user u's
    segment of the routing plan)::

        dW0 = sum_t dy_t x_t^T                  db   = sum_t dy_t
        dB_cat = s_g sum_t dy_t (G_t*h_t)^T     dB_u = s_u sum_{t in u} dy_t z_t^T
        e_t = s_g B_cat^T dy_t                  dh_t = G_t * e_t
        dg_tk = sum_j e_t[kr+j] h_t[kr+j]       dl_t = g_t * (dg_t - <g_t, dg_t>)
        dA_cat = sum_t dh_t x_t^T               dW_r = sum_t dl_t x_t^T
        dc_u = sum_{t in u} dl_t                dz_t = s_u B_u^T dy_t + V_u^T dl_t
        dV_u = sum_{t in u} dl_t z_t^T          dA_u = sum_{t in u} dz_t x_t^T
        dx_t = W0^T dy_t + A_cat^T dh_t + W_r^T dl_t + A_u^T dz_t

    With top_k, g_t is 0 off the kept set, so dl_t is 0 there too (the dropped logits
    get no gradient) and the same formulas hold. dx_t includes W0^T dy_t even when W0
    is frozen. The op returns dx in x.dtype and the rest in fp32 (fp64 for fp64 x).

    The per-user bias c = W_e E^T is an input like any other, so dE and dW_e follow
    from dc through autograd outside this Function. Inputs with requires_grad False
    are skipped in the backward (their flag is off in ``needs``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias,
                user_A, user_B, user_router, user_ids, order, seg_offsets,
                expert_scale, user_scale, top_k, d_out):
        y, h, z, g = mixture_fwd_op(
            x, weight, bias, expert_A, expert_B, router_weight, user_ids, order, seg_offsets,
            user_logit_bias, user_A, user_B, user_router, expert_scale, user_scale, top_k, d_out,
        )
        ctx.save_for_backward(x, h, z, g, weight, expert_A, expert_B, router_weight,
                              user_ids, order, seg_offsets, user_A, user_B, user_router)
        ctx.scales = (expert_scale, user_scale)
        params = (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router)
        ctx.dtypes = [p.dtype if p is not None else None for p in params]
        ctx.y_meta = (y.shape, y.dtype)
        # The gates stay differentiable: their gradient (e.g. from the balance loss)
        # joins dg before the softmax backward. Unused outputs arrive as None.
        ctx.set_materialize_grads(False)
        return y, g

    @staticmethod
    def backward(ctx, dy, dg):
        (x, h, z, g, weight, expert_A, expert_B, router_weight,
         user_ids, order, seg_offsets, user_A, user_B, user_router) = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:_NUM_GRADS])
        if not any(needs) or (dy is None and (dg is None or g.numel() == 0)):
            return (None,) * 17
        if dy is None:  # only the gates were used
            dy = x.new_zeros(ctx.y_meta[0], dtype=ctx.y_meta[1])
        if dg is not None and g.numel() > 0:
            dg = dg.contiguous()
        else:
            dg = None
        grads = mixture_bwd_op(
            dy.contiguous(), x, h, z, g, dg, weight, expert_A, expert_B, router_weight, user_ids,
            order, seg_offsets, user_A, user_B, user_router, ctx.scales[0], ctx.scales[1], needs,
        )
        # ctx.needs_input_grad follows forward's argument order: x, weight, bias,
        # expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router;
        # the op returns (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV): same order.
        out = [gr.to(dt) if need and gr.numel() > 0 else None
               for need, gr, dt in zip(needs, grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None)


def lora_mixture_fused(
    x: Tensor, weight, bias, *, spec: MixtureSpec, plan: Optional[RoutingPlan], return_gates: bool,
    expert_A, expert_B, expert_scale, router_weight, user_ids, user_logit_bias, user_A, user_B,
    user_scale, user_router, top_k,
):
    """The kernel path of ``lora_mixture`` on validated 2-D inputs; returns (y, gates)."""
    if plan is not None:
        user_ids, order, seg_offsets = plan.user_ids, plan.order, plan.seg_offsets
    else:
        # No plan means no user-indexed tensor (lora_mixture builds one for those): the
        # ids, if any, do not matter.
        user_ids = order = seg_offsets = None
    x = x.contiguous()
    y, g = LoraMixtureFunction.apply(
        x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B,
        user_router, user_ids, order, seg_offsets, float(expert_scale), float(user_scale),
        int(top_k or 0), int(spec.d_out),
    )
    return y, (g if spec.has_experts else None)
