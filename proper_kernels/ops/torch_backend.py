"""The fast pure-PyTorch path of :func:`proper_kernels.lora_mixture` (backend "torch").

The rank-space contract of ``proper_kernels.reference.rankspace`` as a few large
GEMMs with a hand-written backward (its chain rule is written out there), instead of
autograd over the reference's per-token gathers. The forward keeps, per token, only
x and the codes ``h = A_cat x`` [K r], ``z = A_u x`` [r_u] and the gates g [K];
everything runs in the compute dtype (float32; float64 stays float64) and each result
comes back in its own tensor's dtype, as the reference does.

The group part is dense (every token, every expert). The user part has two variants:

* ``wide``     every token against every user of the bank: the shrink GEMM runs over
               [A_cat; W_r; A_u of all N users], and a one-hot [T, N] keeps each
               token's own r_u columns; the user bias, the LoRA-aware router, the
               expand and every user gradient are GEMMs with that one-hot. No host
               sync, no loop, but (N - 1) r_u wasted rank columns per token.
* ``segment``  one small GEMM per active user over its slice of the routing plan's
               sorted order (a gather of the user tokens before, a scatter after;
               neither when one user owns the whole batch). It costs a few ops per
               active user and the plan's one host sync (its segment offsets).

:func:`choose_variant` picks the cheaper by a measured cost model; the dispatch
(``proper_kernels.ops.dispatch.choose_path``) calls it and reports the choice.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype, gates_from_logits
from .plan import RoutingPlan

__all__ = ["VARIANTS", "choose_variant", "lora_mixture_torch", "TorchMixtureFunction"]

VARIANTS = ("wide", "segment")

# The cost model of choose_variant, in multiply-adds (MAC). Wide multiplies every
# token by the (N - 1) r_u rank rows of the other users in the shrink and the expand
# (three times that with the backward); segment pays instead a few small ops per
# active user, each worth about OP_COST MACs of GEMM time (CPU: an op of some
# microseconds against a core's tens of GMAC/s; CUDA: a launch against a GPU's TMAC/s).
OP_COST = {"cpu": 60_000, "cuda": 20_000_000}
SEGMENT_OPS_PER_USER = {False: 3, True: 9}  # forward only / forward and backward
# Wide's one-hot rank space is [T, N (r_u + K)]: beyond this width it is never taken.
WIDE_MAX_RANK = 4096


def choose_variant(T: int, d_in: int, d_out: int, K: int, N: Optional[int], r_u: int,
                   active_users: Optional[int], needs_grad: bool, device: torch.device,
                   traced: bool = False) -> Tuple[str, str]:
    """(variant, reason): "wide" or "segment" for one call of the torch backend.

    ``active_users``: how many users have tokens (None where counting them would cost
    a host sync; min(N, T) is assumed then). ``traced`` (under torch.compile): wide,
    which has no host sync and no loop, up to the width limit.
    """
    if not N or (r_u == 0 and K == 0):
        return "wide", "no user terms"
    if N * (r_u + K) > WIDE_MAX_RANK:
        return "segment", f"a large bank: N (r_u + K) = {N * (r_u + K)} > {WIDE_MAX_RANK}"
    if traced:
        return "wide", "traced by torch.compile: no host sync, no loop"
    passes = 3 if needs_grad else 1
    waste = passes * T * (N - 1) * (r_u * (d_in + d_out) + 2 * K)
    users = active_users if active_users is not None else min(N, T)
    loop = max(users, 1) * SEGMENT_OPS_PER_USER[needs_grad] * OP_COST.get(device.type, OP_COST["cuda"])
    some = f"{users}" if active_users is not None else f"at most {users}"
    if loop < waste:
        return "segment", f"{some} active of {N} users: a loop over them costs less than all users' ranks"
    return "wide", f"{some} active of {N} users: all users' ranks cost less than a loop over them"


class _Routing(NamedTuple):
    """The routing of a batch as the variants read it."""

    variant: str
    ids: Optional[Tensor]    # [T] int (-1 = no user); None: no user terms
    N: int
    tok: Optional[Tensor]    # segment: [T_u] int64, the tokens with a user, sorted by user; None: all, in order
    users: Optional[Tensor]  # segment: [T_u] int64, their users
    segs: List[Tuple[int, int, int]]  # segment: (user, start, end) of each active user's run in tok


def _routing(variant: str, ids: Optional[Tensor], plan: Optional[RoutingPlan], N: int) -> _Routing:
    if ids is None or N == 0:
        return _Routing("wide", None, 0, None, None, [])
    if variant == "wide":
        return _Routing("wide", ids, N, None, None, [])
    if plan is None:
        plan = RoutingPlan(ids, N, check=False)
    segs = plan.segments()  # the plan's host sync
    first = segs[0][1] if segs else plan.num_tokens
    if first == 0 and len(segs) == 1:  # one user owns the batch: no gather, no scatter
        return _Routing("segment", ids, N, None, None, segs)
    tok = plan.order[first:].long()
    return _Routing("segment", ids, N, tok, ids[tok].long(), [(u, s - first, e - first) for u, s, e in segs])


def _take(t: Tensor, rt: _Routing) -> Tensor:
    """Rows of ``t`` [T, ...] of the user tokens, sorted by user (segment)."""
    return t if rt.tok is None else t[rt.tok]


def _add_back(dst: Tensor, src: Tensor, rt: _Routing) -> Tensor:
    """dst [T, m] += src [T_u, m] (rows in the order of _take), in place."""
    return dst.add_(src) if rt.tok is None else dst.index_add_(0, rt.tok, src)


def _cd(t: Optional[Tensor], cd: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(cd)


def _one_hot(ids: Tensor, N: int, cd: torch.dtype) -> Tensor:
    """[T, N] in cd: 1 where token t belongs to user n (rows of id -1 are zero)."""
    return (ids.unsqueeze(1) == torch.arange(N, device=ids.device)).to(cd)


def _cols(B: Tensor) -> Tensor:
    """B [M, d_out, r] -> [d_out, M r]: M stacked LoRA up-projections as one matrix."""
    return B.permute(1, 0, 2).reshape(B.shape[1], -1)


def _shrink(A_g: Optional[Tensor], W_r: Optional[Tensor], A_u: Optional[Tensor]) -> Tensor:
    """[K r + K + N r_u, d_in]: the rows present of [A_cat; W_r; A_u of all users]."""
    rows = [t.reshape(-1, t.shape[-1]) for t in (A_g, W_r, A_u) if t is not None]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _forward(x, weight, bias, ad: Adapters, rt: _Routing, d_out: int, save: bool):
    """(y [T, d_out] in x.dtype, h [T, K r], z [T, r_u], g [T, K]); the codes in the
    compute dtype, h and z None unless ``save``."""
    cd = compute_dtype(x.dtype)
    A_g, B_g, W_r, c, A_u, B_u, V = (_cd(t, cd) for t in ad.tensors())
    xc = x.to(cd)
    T = xc.shape[0]
    K, r, N, r_u = ad.num_experts, ad.expert_rank, rt.N, ad.user_rank
    if weight is not None:
        y = F.linear(xc, weight.to(cd), _cd(bias, cd))
    else:
        y = xc.new_zeros(T, d_out) if bias is None else bias.to(cd).expand(T, d_out).clone()
    wide = rt.variant == "wide" and N > 0
    seg = rt.variant == "segment"
    A_wide = A_u if (wide and A_u is not None) else None
    h = logits = z = zw = None
    if K or A_wide is not None:
        H = xc @ _shrink(A_g, W_r, A_wide).t()
        h = H[:, : K * r]
        if W_r is not None:
            logits = H[:, K * r: K * r + K]
    if wide:
        onehot = _one_hot(rt.ids, N, cd)
        if A_u is not None:
            zw = H[:, H.shape[1] - N * r_u:].view(T, N, r_u) * onehot.unsqueeze(-1)  # own user's slot only
            z = zw.sum(1) if save else None
            zw = zw.view(T, N * r_u)
        if K and c is not None:
            logits = torch.addmm(logits, onehot, c) if logits is not None else onehot @ c
        if K and V is not None:
            logits = torch.addmm(logits, zw, V.transpose(1, 2).reshape(N * r_u, K))
    elif seg:
        if A_u is not None:
            xs = _take(xc, rt)
            zs = xs.new_empty(xs.shape[0], r_u)
            for u, s, e in rt.segs:
                torch.mm(xs[s:e], A_u[u].t(), out=zs[s:e])
            if save:
                z = zs if rt.tok is None else xc.new_zeros(T, r_u).index_copy_(0, rt.tok, zs)
        if K and V is not None:  # l_t += c_u + V_u z_t, per user
            ls = zs.new_empty(zs.shape[0], K)
            for u, s, e in rt.segs:
                if c is not None:
                    torch.addmm(c[u], zs[s:e], V[u].t(), out=ls[s:e])
                else:
                    torch.mm(zs[s:e], V[u].t(), out=ls[s:e])
        elif K and c is not None:
            ls = c[rt.segs[0][0]].expand(T, K) if rt.tok is None else c[rt.users]
        if K and (V is not None or c is not None) and rt.segs:
            if rt.tok is None:
                logits = ls if logits is None else logits + ls
            else:
                logits = (xc.new_zeros(T, K) if logits is None else logits).index_add(0, rt.tok, ls)
    if K:
        if logits is None:
            logits = xc.new_zeros(T, K)
        g = gates_from_logits(logits, ad.top_k)
        hg = (h.view(T, K, r) * g.unsqueeze(-1)).view(T, K * r)
        y.addmm_(hg, _cols(B_g).t(), alpha=ad.expert_scale)
    else:
        g = xc.new_zeros(T, 0)
    if zw is not None:
        y.addmm_(zw, _cols(B_u).t(), alpha=ad.user_scale)
    elif seg and A_u is not None:
        if rt.tok is None:
            (u, _, _), = rt.segs
            y.addmm_(zs, B_u[u].t(), alpha=ad.user_scale)
        else:
            ys = zs.new_empty(zs.shape[0], d_out)
            for u, s, e in rt.segs:
                torch.mm(zs[s:e], B_u[u].t(), out=ys[s:e])
            y.index_add_(0, rt.tok, ys, alpha=ad.user_scale)
    if save:
        h = h.contiguous() if h is not None else xc.new_zeros(T, 0)  # not a view keeping all of H alive
        z = z if z is not None else xc.new_zeros(T, r_u)
    return y.to(x.dtype), h, z, g


def _backward(dy, dg_ext, x, h, z, g, weight, ad: Adapters, rt: _Routing, needs):
    """The 10 gradients (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV) in the
    compute dtype (None where not needed): the chain rule of rankspace.py."""
    n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V = needs
    cd = compute_dtype(x.dtype)
    A_g, B_g, W_r, c, A_u, B_u, V = (_cd(t, cd) for t in ad.tensors())
    xc, dyc = x.to(cd), dy.to(cd)
    T, d_in = xc.shape
    d_out = dyc.shape[1]
    K, r, N, r_u = ad.num_experts, ad.expert_rank, rt.N, ad.user_rank
    s_g, s_u = ad.expert_scale, ad.user_scale
    wide = rt.variant == "wide" and N > 0
    seg = rt.variant == "segment"
    dx = dyc @ weight.to(cd) if (n_x and weight is not None) else (xc.new_zeros(T, d_in) if n_x else None)
    dW0 = dyc.t() @ xc if n_w else None
    db = dyc.sum(0) if n_b else None
    dA_g = dB_g = dW_r = dc = dA_u = dB_u = dV = None
    # The code gradients [dh | dl | dz of all users (wide)] meet the shrink rows
    # [A_cat; W_r; A_u of all users] in one GEMM for dx and one for their gradient.
    A_wide = A_u if (wide and A_u is not None and (n_Au or n_x)) else None
    widths = [K * r if K else 0, K if W_r is not None else 0, N * r_u if A_wide is not None else 0]
    D = xc.new_empty(T, sum(widths))
    dh_, dl_, dzw_ = D.split(widths, dim=1)
    dl = None
    if K:
        e = (dyc @ _cols(B_g)).view(T, K, r)  # B_cat^T dy_t, before the scale and the gates
        if n_Bg:
            hg = (h.view(T, K, r) * g.unsqueeze(-1)).view(T, K * r)
            dB_g = (dyc.t() @ hg).mul_(s_g).view(d_out, K, r).permute(1, 0, 2)
        dg = (e * h.view(T, K, r)).sum(-1).mul_(s_g)
        if dg_ext is not None:
            dg = dg + dg_ext.to(cd)
        # softmax backward; zero off the top_k set, where g is zero
        dl = torch.mul(g, dg - (g * dg).sum(-1, keepdim=True), out=dl_ if W_r is not None else None)
        torch.mul(e, (g * s_g).unsqueeze(-1), out=dh_.view(T, K, r))
    if wide:
        onehot = _one_hot(rt.ids, N, cd)
        if K and c is not None and n_c:
            dc = onehot.t() @ dl
        if A_u is not None:
            zw = (z.unsqueeze(1) * onehot.unsqueeze(-1)).view(T, N * r_u)
            if n_Bu:
                dB_u = (dyc.t() @ zw).mul_(s_u).view(d_out, N, r_u).permute(1, 0, 2)
            if V is not None and n_V:
                dV = (zw.t() @ dl).view(N, r_u, K).transpose(1, 2)
            if A_wide is not None:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t, in the token's own slot
                if V is not None:
                    dzw = torch.addmm(dl @ V.permute(1, 0, 2).reshape(K, N * r_u), dyc, _cols(B_u), alpha=s_u)
                else:
                    dzw = (dyc @ _cols(B_u)).mul_(s_u)
                torch.mul(dzw.view(T, N, r_u), onehot.unsqueeze(-1), out=dzw_.view(T, N, r_u))
    if D.shape[1] and (n_x or n_Ag or n_Wr or n_Au):
        S = _shrink(A_g, W_r, A_wide)
        if n_x:
            dx.addmm_(D, S)
        if n_Ag or (n_Wr and W_r is not None) or A_wide is not None:
            dS = (D.t() @ xc).split(widths, dim=0)
            dA_g = dS[0].view(K, r, d_in) if (K and n_Ag) else None
            dW_r = dS[1] if (W_r is not None and n_Wr) else None
            dA_u = dS[2].view(N, r_u, d_in) if (A_wide is not None and n_Au) else None
    if seg:
        dls = _take(dl, rt) if dl is not None else None
        if K and c is not None and n_c:
            if rt.tok is None:
                (u, _, _), = rt.segs
                dc = xc.new_zeros(N, K)
                dc[u] = dls.sum(0)
            else:
                dc = xc.new_zeros(N, K).index_add_(0, rt.users, dls)
        if A_u is not None:
            zs, dys = _take(z, rt), _take(dyc, rt)
            if V is not None and n_V:
                dV = xc.new_zeros(N, K, r_u)
                for u, s, e in rt.segs:
                    torch.mm(dls[s:e].t(), zs[s:e], out=dV[u])
            if n_Bu:
                dB_u = xc.new_zeros(N, d_out, r_u)
                for u, s, e in rt.segs:
                    torch.mm(dys[s:e].t(), zs[s:e], out=dB_u[u])
                dB_u.mul_(s_u)
            if n_Au or n_x:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t
                dzs = zs.new_empty(zs.shape)
                for u, s, e in rt.segs:
                    if V is not None:
                        torch.addmm(dls[s:e] @ V[u], dys[s:e], B_u[u], alpha=s_u, out=dzs[s:e])
                    else:
                        torch.mm(dys[s:e], B_u[u], out=dzs[s:e]).mul_(s_u)
                if n_Au:
                    xs = _take(xc, rt)
                    dA_u = xc.new_zeros(N, r_u, d_in)
                    for u, s, e in rt.segs:
                        torch.mm(dzs[s:e].t(), xs[s:e], out=dA_u[u])
                if n_x:
                    dxs = dzs.new_empty(dzs.shape[0], d_in)
                    for u, s, e in rt.segs:
                        torch.mm(dzs[s:e], A_u[u], out=dxs[s:e])
                    _add_back(dx, dxs, rt)
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


class TorchMixtureFunction(torch.autograd.Function):
    """Autograd of the torch backend: the forward saves x and the codes (h, z, g),
    the backward applies the chain rule of ``proper_kernels.reference.rankspace``
    (written out there for every tensor) as a few GEMMs. The gates stay
    differentiable: their gradient (e.g. from the balance loss) joins dg before the
    softmax backward. Arguments: the 10 tensors of the op in the order of its
    gradients, then the routing, the scales, top_k and d_out."""

    @staticmethod
    def forward(ctx, x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B,
                user_router, rt, expert_scale, user_scale, top_k, d_out):
        ad = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                      expert_scale, user_scale, top_k)
        y, h, z, g = _forward(x, weight, bias, ad, rt, d_out, save=True)
        ctx.save_for_backward(x, h, z, g, weight, *ad.tensors())
        ctx.rt, ctx.scales, ctx.d_out = rt, (expert_scale, user_scale), d_out
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias) + ad.tensors()]
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return y, g

    @staticmethod
    def backward(ctx, dy, dg):
        x, h, z, g, weight, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[:10]
        if not any(needs) or (dy is None and (dg is None or g.numel() == 0)):
            return (None,) * 15
        if dy is None:  # only the gates were used
            dy = x.new_zeros(x.shape[0], ctx.d_out)
        ad = Adapters(*tensors, expert_scale=ctx.scales[0], user_scale=ctx.scales[1])
        grads = _backward(dy, dg if g.numel() else None, x, h, z, g, weight, ad, ctx.rt, needs)
        out = [gr.to(dt) if need else None for need, gr, dt in zip(needs, grads, ctx.dtypes)]
        return (*out,) + (None,) * 5


def lora_mixture_torch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Adapters,
                       user_ids: Optional[Tensor], *, d_out: int, num_users: Optional[int] = None,
                       plan: Optional[RoutingPlan] = None, variant: str = "wide"):
    """The torch backend on validated 2-D inputs.

    Args:
        x: [T, d_in]; weight, bias, adapters: as in :func:`proper_kernels.lora_mixture`.
        user_ids: [T] int in [-1, N) (None when no tensor is indexed by user).
        d_out: the output size. num_users: N (default: from the adapters).
        plan: the RoutingPlan of user_ids, read by the segment variant (built here
            when None). variant: "wide" or "segment" (see :func:`choose_variant`).

    Returns:
        (y [T, d_out] in x.dtype, gates [T, K] in the compute dtype or None without
        experts), differentiable in every tensor.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    N = num_users if num_users is not None else (adapters.num_users or 0)
    rt = _routing(variant, user_ids, plan, N)
    tensors = (x, weight, bias) + adapters.tensors()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, g = TorchMixtureFunction.apply(*tensors, rt, float(adapters.expert_scale), float(adapters.user_scale),
                                          adapters.top_k, int(d_out))
    else:
        y, _, _, g = _forward(x, weight, bias, adapters, rt, d_out, save=False)
    return y, (g if adapters.num_experts else None)
