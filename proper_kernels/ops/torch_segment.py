"""The torch backend's segment variant: the user terms over the routing plan's per-user
tiles (one batched GEMM each), or over the rows of the one user owning the batch; the
group part dense. Also the group part alone, for calls without user terms."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype, gates_from_logits
from .packs import _build_cols, _build_rows, _cast, _packed
from .torch_routing import _Routing


def _tiled(t: Tensor, rt: _Routing) -> Tensor:
    """The rows of ``t`` [T, m] as tiles [G, L, m] (padding rows hold some token's row)."""
    return t[rt.rows].view(rt.G, rt.L, -1)


def _untile_add(dst: Tensor, src: Tensor, rt: _Routing, alpha: float = 1.0) -> Tensor:
    """dst [T, m] += alpha * src [G, L, m] (zero on padding rows), in place."""
    return dst.index_add_(0, rt.rows, src.reshape(-1, dst.shape[1]), alpha=alpha)


def _per_tile(W: Tensor, rt: _Routing, cd: torch.dtype) -> Tensor:
    """A user-indexed tensor [N, ...] as one entry per tile [G, ...], in cd (cast after
    the selection: only the tiles' users are converted, not the whole bank)."""
    return _cast(W if rt.users is None else W.index_select(0, rt.users), cd)


def _per_user(t: Tensor, rt: _Routing) -> Tensor:
    """Results [n, ...] of the wide users (all N, or the one user) or of the tiles,
    as the gradient of a user-indexed tensor [N, ...] (zero for users not present)."""
    if rt.user >= 0:
        out = t.new_zeros((rt.N,) + tuple(t.shape[1:]))
        out[rt.user: rt.user + 1] = t
        return out
    if rt.users is None:
        return t
    return t.new_zeros((rt.N,) + tuple(t.shape[1:])).index_add_(0, rt.users, t)


class _Weights(NamedTuple):
    """The GEMM operands of a segment call in the compute dtype (None where absent);
    the user ones are the rows of the one user owning the batch (else None: the
    tiles gather theirs)."""

    S: Optional[Tensor]    # [K r (+ K), d_in]  [A_cat; W_r]
    Bg: Optional[Tensor]   # [d_out, K r]       B_cat
    Su: Optional[Tensor]   # [r_u, d_in]        A_u[u]
    Bu: Optional[Tensor]   # [d_out, r_u]       B_u[u]
    Vm: Optional[Tensor]   # [r_u, K]           V[u]^T
    c: Optional[Tensor]    # [1, K]             c[u]


def _group_weights(cd: torch.dtype, A_g: Tensor, B_g: Tensor, W_r: Optional[Tensor]):
    return _build_rows(cd, A_g, W_r), _build_cols(cd, B_g)


def _weights(ad: Adapters, rt: _Routing, cd: torch.dtype) -> _Weights:
    S = Bg = Su = Bu = Vm = c = None
    if ad.expert_A is not None:
        S, Bg = _packed(("group", cd), partial(_group_weights, cd), ad.expert_A, ad.expert_B, ad.router_weight)
    A_u, B_u, V, c_all = ad.user_A, ad.user_B, ad.user_router, ad.user_logit_bias
    if rt.user >= 0:  # one user's rows: views
        u = rt.user
        if A_u is not None:
            Su, Bu = _cast(A_u[u], cd), _cast(B_u[u], cd)
            Vm = _cast(V[u], cd).t() if V is not None else None
        c = _cast(c_all[u:u + 1], cd) if c_all is not None else None
    return _Weights(S, Bg, Su, Bu, Vm, c)


def _forward_segment(x, weight, bias, ad: Adapters, rt: _Routing, d_out: int, save: bool):
    """The segment variant (and the group part alone, without user terms): (y [T, d_out]
    in x.dtype, h [T, K r], z [T, r_u], g [T, K], the GEMM operands); the codes in the
    compute dtype, h and z None unless ``save``."""
    cd = compute_dtype(x.dtype)
    xc = _cast(x, cd)
    T = xc.shape[0]
    K, r = ad.num_experts, ad.expert_rank
    A_u = ad.user_A
    r_u = A_u.shape[1] if A_u is not None else 0
    w = _weights(ad, rt, cd)
    if weight is not None:
        y = F.linear(xc, _cast(weight, cd), _cast(bias, cd))
    else:
        y = xc.new_zeros(T, d_out) if bias is None else _cast(bias, cd).expand(T, d_out).clone()
    h = logits = z = zw = zp = None
    if K:
        H = xc @ w.S.t()  # [T, K r (+ K)]
        h = H[:, : K * r]
        if ad.router_weight is not None:
            logits = H[:, K * r:]
    if rt.user >= 0:  # one user owns the batch: its rows as plain GEMMs
        if w.Su is not None:
            zw = z = xc @ w.Su.t()
        if K and w.c is not None:
            logits = logits + w.c if logits is not None else w.c.expand(T, K)
        if K and w.Vm is not None:
            logits = torch.addmm(logits, zw, w.Vm) if logits is not None else zw @ w.Vm
    elif rt.G:  # tiles
        mask = _cast(rt.mask, cd)
        c, V = ad.user_logit_bias, ad.user_router
        if A_u is not None:
            zp = torch.bmm(_tiled(xc, rt), _per_tile(A_u, rt, cd).transpose(1, 2))  # [G, L, r_u]
            if mask is not None:
                zp.mul_(mask)
            if save:
                z = _untile_add(xc.new_zeros(T, r_u), zp, rt)
        if K and (c is not None or V is not None):  # l_t += c_u + V_u z_t
            cp = _per_tile(c, rt, cd).unsqueeze(1) if c is not None else None
            if V is not None:
                Vt = _per_tile(V, rt, cd).transpose(1, 2)
                lp = torch.baddbmm(cp, zp, Vt) if cp is not None else torch.bmm(zp, Vt)
            else:
                lp = cp.expand(rt.G, rt.L, K)
            if cp is not None and mask is not None:
                lp = lp * mask
            logits = (xc.new_zeros(T, K) if logits is None else logits).index_add(0, rt.rows, lp.reshape(-1, K))
    if K:
        g = gates_from_logits(logits if logits is not None else xc.new_zeros(T, K), ad.top_k)
        hg = (h.view(T, K, r) * g.unsqueeze(-1)).view(T, K * r)
        y.addmm_(hg, w.Bg.t(), alpha=ad.expert_scale)
    else:
        g = xc.new_zeros(T, 0)
    if zw is not None:
        y.addmm_(zw, w.Bu.t(), alpha=ad.user_scale)
    elif zp is not None:
        _untile_add(y, torch.bmm(zp, _per_tile(ad.user_B, rt, cd).transpose(1, 2)), rt, alpha=ad.user_scale)
    if save:
        h = h if h is not None else xc.new_zeros(T, 0)
        z = z if z is not None else xc.new_zeros(T, r_u)
    return _cast(y, x.dtype), h, z, g, w


def _backward_segment(dy, dg_ext, x, h, z, g, weight, ad: Adapters, rt: _Routing, w: _Weights, needs):
    """The segment variant's 10 gradients (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u,
    dV) in the compute dtype (None where not needed): the chain rule of rankspace.py.
    ``w``: the forward's GEMM operands."""
    n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V = needs
    cd = compute_dtype(x.dtype)
    c, A_u, B_u, V = ad.user_logit_bias, ad.user_A, ad.user_B, ad.user_router
    xc, dyc = _cast(x, cd), _cast(dy, cd)
    T, d_in = xc.shape
    d_out = dyc.shape[1]
    K, r = ad.num_experts, ad.expert_rank
    s_g, s_u = ad.expert_scale, ad.user_scale
    has_router = ad.router_weight is not None
    dx = dW0 = db = dA_g = dB_g = dW_r = dc = dA_u = dB_u = dV = dl = None
    if n_x:
        dx = dyc @ _cast(weight, cd) if weight is not None else xc.new_zeros(T, d_in)
    if n_w:
        dW0 = dyc.t() @ xc
    if n_b:
        db = dyc.sum(0)
    if K:
        gs = (g * s_g).unsqueeze(-1)
        h3 = h.view(T, K, r)
        e = (dyc @ w.Bg).view(T, K, r)  # B_cat^T dy_t, before the scale and the gates
        if n_Bg:
            dB_g = (dyc.t() @ (h3 * gs).view(T, K * r)).view(d_out, K, r).permute(1, 0, 2)
        dg = (e * h3).sum(-1).mul_(s_g)
        if dg_ext is not None:
            dg = dg + _cast(dg_ext, cd)
        # softmax backward; zero off the top_k set, where g is zero
        dl = g * (dg - (g * dg).sum(-1, keepdim=True))
        if n_x or n_Ag or (n_Wr and has_router):  # [dh | dl] against the shrink rows [A_cat; W_r]
            D = (e * gs).view(T, K * r)
            if has_router:
                D = torch.cat([D, dl], 1)
            if n_x:
                dx.addmm_(D, w.S)
            if n_Ag or (n_Wr and has_router):
                dS = D.t() @ xc
                dA_g = dS[: K * r].view(K, r, d_in) if n_Ag else None
                dW_r = dS[K * r:] if (n_Wr and has_router) else None
    if rt.user >= 0:  # one user owns the batch: its rows as plain GEMMs
        if K and c is not None and n_c:
            dc = _per_user(dl.sum(0, keepdim=True), rt)
        if A_u is not None:
            if n_Bu:
                dB_u = _per_user((dyc.t() @ z).mul_(s_u).unsqueeze(0), rt)
            if V is not None and n_V:
                dV = _per_user((dl.t() @ z).unsqueeze(0), rt)
            if n_Au or n_x:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t
                if V is not None:
                    dz = torch.addmm(dl @ w.Vm.t(), dyc, w.Bu, alpha=s_u)
                else:
                    dz = (dyc @ w.Bu).mul_(s_u)
                if n_x:
                    dx.addmm_(dz, w.Su)
                if n_Au:
                    dA_u = _per_user((dz.t() @ xc).unsqueeze(0), rt)
    elif rt.G:  # tiles
        mask = _cast(rt.mask, cd)
        dlp = _tiled(dl, rt) if dl is not None else None  # [G, L, K]
        if K and c is not None and n_c:
            dc = _per_user((dlp * mask if mask is not None else dlp).sum(1), rt)
        if A_u is not None:
            zp = _tiled(z, rt)
            if mask is not None:
                zp = zp * mask
            dyp = _tiled(dyc, rt)  # its padding rows meet zero rows of zp, or are masked in dz
            if n_Bu:
                dB_u = _per_user(torch.bmm(dyp.transpose(1, 2), zp).mul_(s_u), rt)
            if V is not None and n_V:
                dV = _per_user(torch.bmm(dlp.transpose(1, 2), zp), rt)
            if n_Au or n_x:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t
                Bp = _per_tile(B_u, rt, cd)
                if V is not None:
                    dzp = torch.baddbmm(torch.bmm(dlp, _per_tile(V, rt, cd)), dyp, Bp, alpha=s_u)
                else:
                    dzp = torch.bmm(dyp, Bp).mul_(s_u)
                if mask is not None:
                    dzp.mul_(mask)
                if n_Au:
                    dA_u = _per_user(torch.bmm(dzp.transpose(1, 2), _tiled(xc, rt)), rt)
                if n_x:
                    _untile_add(dx, torch.bmm(dzp, _per_tile(A_u, rt, cd)), rt)
    # Parameters of users absent from the batch (or of an empty bank) get zeros.
    if n_c and c is not None and dc is None:
        dc = xc.new_zeros(c.shape)
    if n_Au and A_u is not None and dA_u is None:
        dA_u = xc.new_zeros(A_u.shape)
    if n_Bu and B_u is not None and dB_u is None:
        dB_u = xc.new_zeros(B_u.shape)
    if n_V and V is not None and dV is None:
        dV = xc.new_zeros(V.shape)
    return dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV


