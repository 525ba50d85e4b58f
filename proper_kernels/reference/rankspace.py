"""Rank-space forward and backward in PyTorch: the contract of the fused kernels.

The fused kernels never build a [T, K, d] tensor. Their forward saves only x and the
rank-space codes of every token::

    h_t = A_cat x_t        [K r]   ungated expert codes (A_cat = A_g stacked to [K r, d_in])
    z_t = A_u x_t          [r_u]   user code (zero for tokens without a user)
    g_t                    [K]     gates

and their backward rebuilds every gradient from (dy, x, h, z, g). These functions are
that contract written with torch ops, per user segment of a :class:`RoutingPlan`;
the kernels' tests compare against them, and the custom ops fall back to them where
no kernel runs. Chain rule (G_t = g_t repeated r times, s_g, s_u the scales)::

    y_t      = W0 x_t + b + s_g B_cat (G_t * h_t) + s_u B_u z_t
    dB_cat   = s_g sum_t dy_t (G_t * h_t)^T           dB_u = s_u sum_{t in u} dy_t z_t^T
    e_t      = s_g B_cat^T dy_t                        (expert-code grad before gating)
    dh_t     = G_t * e_t                               dg_tk = sum_j e_t[k r + j] h_t[k r + j]
    dl_t     = g_t * (dg_t - <g_t, dg_t>)              (softmax; zero off the top_k set)
    dW_r     = sum_t dl_t x_t^T                        dc_u = sum_{t in u} dl_t
    dz_t     = s_u B_u^T dy_t + V_u^T dl_t             dV_u = sum_{t in u} dl_t z_t^T
    dA_cat   = sum_t dh_t x_t^T                        dA_u = sum_{t in u} dz_t x_t^T
    dx_t     = W0^T dy_t + A_cat^T dh_t + W_r^T dl_t + A_u^T dz_t
    dW0      = sum_t dy_t x_t^T                        db = sum_t dy_t
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .adapters import Adapters
from .mixture import compute_dtype, gates_from_logits

__all__ = ["mixture_fwd_ref", "mixture_bwd_ref"]


def _segments(user_ids: Optional[Tensor]):
    """(user, token indices) for every user present, in ascending user order."""
    if user_ids is None:
        return []
    ids = user_ids.long()
    order = torch.sort(ids, stable=True).indices
    users, counts = torch.unique_consecutive(ids[order], return_counts=True)
    out, start = [], 0
    for u, c in zip(users.tolist(), counts.tolist()):
        if u >= 0:
            out.append((u, order[start : start + c]))
        start += c
    return out


def mixture_fwd_ref(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Adapters,
    user_ids: Optional[Tensor], d_out: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, d_in] -> (y [T, d_out] in x.dtype, h [T, K r], z [T, r_u], g [T, K]).

    h, z, g are in the compute dtype (fp32, or fp64 for fp64 x); an absent part gives
    a [T, 0] tensor.
    """
    (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
     expert_scale, user_scale, top_k) = adapters
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    T = x.shape[0]
    y = xc @ weight.to(cd).t() if weight is not None else xc.new_zeros(T, d_out)
    if bias is not None:
        y = y + bias.to(cd)
    r_u = user_A.shape[1] if user_A is not None else 0
    z = xc.new_zeros(T, r_u)
    segs = _segments(user_ids)
    if user_A is not None:
        for u, tok in segs:
            z[tok] = xc[tok] @ user_A[u].to(cd).t()
    if expert_A is not None:
        K, r = expert_A.shape[0], expert_A.shape[1]
        logits = xc @ router_weight.to(cd).t() if router_weight is not None else xc.new_zeros(T, K)
        for u, tok in segs:
            if user_logit_bias is not None:
                logits[tok] += user_logit_bias[u].to(cd)
            if user_router is not None:
                logits[tok] += z[tok] @ user_router[u].to(cd).t()
        g = gates_from_logits(logits, top_k)
        h = xc @ expert_A.to(cd).reshape(K * r, -1).t()
        B_cat = expert_B.to(cd).permute(1, 0, 2).reshape(d_out, K * r)
        y = y + expert_scale * ((h * g.repeat_interleave(r, dim=-1)) @ B_cat.t())
    else:
        h, g = xc.new_zeros(T, 0), xc.new_zeros(T, 0)
    if user_B is not None:
        for u, tok in segs:
            y[tok] += user_scale * (z[tok] @ user_B[u].to(cd).t())
    return y.to(x.dtype), h, z, g


def mixture_bwd_ref(
    dy: Tensor, x: Tensor, h: Tensor, z: Tensor, g: Tensor, weight: Optional[Tensor],
    adapters: Adapters, user_ids: Optional[Tensor], needs: Tuple[bool, ...], *,
    dg_ext: Optional[Tensor] = None, num_users: Optional[int] = None,
):
    """Gradients of :func:`mixture_fwd_ref` from the saved codes.

    ``dg_ext`` [T, K] is the gradient that reaches the gates directly (when the
    caller uses them, e.g. in the balance loss); it joins dg before the softmax
    backward. ``num_users`` sizes dc when no other user tensor does.

    ``needs`` has 10 flags, in the order of the result: (dx, dweight, dbias, dexpert_A,
    dexpert_B, drouter_weight, duser_logit_bias, duser_A, duser_B, duser_router).
    Returns that 10-tuple, each a tensor in the compute dtype or None where not needed
    or not applicable (the caller casts to each parameter's dtype). The adapters'
    user_logit_bias and top_k are not read: the saved gates carry both.
    """
    (n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V) = needs
    expert_A, expert_B, router_weight, _, user_A, user_B, user_router, expert_scale, user_scale, _ = adapters
    cd = compute_dtype(x.dtype)
    dyc, xc = dy.to(cd), x.to(cd)
    T, d_out = dyc.shape
    N = next((t.shape[0] for t in (user_A, user_router) if t is not None), num_users)
    segs = _segments(user_ids)
    dx = dyc @ weight.to(cd) if (n_x and weight is not None) else xc.new_zeros(xc.shape)
    dW0 = dyc.t() @ xc if n_w else None
    db = dyc.sum(0) if n_b else None
    dA_g = dB_g = dW_r = dc = dA_u = dB_u = dV = None
    dl = None
    if expert_A is not None:
        K, r = expert_A.shape[0], expert_A.shape[1]
        G = g.repeat_interleave(r, dim=-1)
        B_cat = expert_B.to(cd).permute(1, 0, 2).reshape(d_out, K * r)
        if n_Bg:
            dB_g = (expert_scale * dyc.t() @ (G * h)).reshape(d_out, K, r).permute(1, 0, 2)
        e = expert_scale * (dyc @ B_cat)
        dh = G * e
        dg = (e * h).reshape(T, K, r).sum(-1)
        if dg_ext is not None:
            dg = dg + dg_ext.to(cd)
        dl = g * (dg - (g * dg).sum(-1, keepdim=True))
        if n_Ag:
            dA_g = (dh.t() @ xc).reshape(K, r, -1)
        if n_Wr and router_weight is not None:
            dW_r = dl.t() @ xc
        if n_x:
            dx = dx + dh @ expert_A.to(cd).reshape(K * r, -1)
            if router_weight is not None:
                dx = dx + dl @ router_weight.to(cd)
        if n_c:
            dc = xc.new_zeros(N, K)
            for u, tok in segs:
                dc[u] = dl[tok].sum(0)
        if n_V and user_router is not None:
            dV = xc.new_zeros(user_router.shape)
            for u, tok in segs:
                dV[u] = dl[tok].t() @ z[tok]
    if user_A is not None:
        dA_u = xc.new_zeros(user_A.shape) if n_Au else None
        dB_u = xc.new_zeros(user_B.shape) if n_Bu else None
        for u, tok in segs:
            dyu, zu, xu = dyc[tok], z[tok], xc[tok]
            if n_Bu:
                dB_u[u] = user_scale * dyu.t() @ zu
            if n_Au or n_x:
                dz = user_scale * dyu @ user_B[u].to(cd)
                if user_router is not None and dl is not None:
                    dz = dz + dl[tok] @ user_router[u].to(cd)
                if n_Au:
                    dA_u[u] = dz.t() @ xu
                if n_x:
                    dx[tok] += dz @ user_A[u].to(cd)
    return (dx if n_x else None, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV)
