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
* ``segment``  the tokens grouped by user in the routing plan's sorted order, cut
               into tiles of one user each; every per-user product is one batched
               GEMM over the tiles (a gather of the user tokens before, a scatter
               after). One user owning the whole batch needs neither: its terms are
               plain GEMMs. Its cost follows the tokens, not the bank; it needs the
               plan's segment offsets on the host (one sync on CUDA).

:func:`choose_variant` picks one; the dispatch (``proper_kernels.ops.dispatch.
choose_path``) calls it and reports the choice.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype, gates_from_logits
from .plan import RoutingPlan

__all__ = ["VARIANTS", "choose_variant", "lora_mixture_torch", "TorchMixtureFunction"]

VARIANTS = ("wide", "segment")

# Wide's one-hot rank space is [T, N (r_u + K)]: beyond this width it is never taken.
WIDE_MAX_RANK = 4096


def choose_variant(N: Optional[int], r_u: int, K: int, device: torch.device,
                   traced: bool = False) -> Tuple[str, str]:
    """(variant, reason): "wide" or "segment" for one call of the torch backend.

    On the CPU segment: its cost follows the tokens, wide's the whole bank, and the
    plan's segment offsets cost no device sync there (measured: segment is at least
    as fast as wide in every cpu-small case, up to 1.7x faster). Elsewhere (CUDA) and
    under torch.compile (``traced``) wide, which has no host sync and no loop, up to
    WIDE_MAX_RANK rank columns.
    """
    if not N or (r_u == 0 and K == 0):
        return "wide", "no user terms"
    width = N * (r_u + K)
    if width > WIDE_MAX_RANK:
        return "segment", f"a large bank: N (r_u + K) = {width} > {WIDE_MAX_RANK}"
    if traced:
        return "wide", "traced by torch.compile: no host sync"
    if device.type == "cpu":
        return "segment", "on the CPU the user terms follow the tokens, grouped by the plan's segments"
    return "wide", f"one-hot over the bank's N (r_u + K) = {width} columns, no host sync"


class _Routing(NamedTuple):
    """The routing of a batch as the variants read it.

    Three layouts of the user terms: ``wide`` (all N users' ranks, a one-hot keeps
    each token's own); one user owning the whole batch (segment; computed as wide over
    that one user, with no mask); and tiles (segment): the user tokens, in the plan's
    sorted order, cut into G tiles of L rows, each within one user's run, so that every
    per-user product is one batched GEMM over [G, L, ...]. ``rows`` holds the token of
    each tile row; the padding rows past a tile's end repeat some token, ``mask``
    zeroes them.
    """

    variant: str
    ids: Optional[Tensor]            # [T] int (-1 = no user); None: no user terms
    N: int
    user: int = -1                   # >= 0: this user owns every token of the batch
    G: int = 0                       # tiles: their number (0: no tiles)
    L: int = 0                       # tiles: rows per tile
    rows: Optional[Tensor] = None    # tiles: [G L] int64, the token of each tile row
    mask: Optional[Tensor] = None    # tiles: [G, L, 1] float32, 1 on rows that hold their tile's token; None: all do
    users: Optional[Tensor] = None   # tiles: [G] int64, the user of each tile; None: tile g is user g (G = N)

    @property
    def wide(self) -> bool:
        """Whether the user terms run as wide GEMMs (all users' ranks, or the one user's)."""
        return self.user >= 0 or (self.variant == "wide" and self.N > 0)


# The segment routings of a plan (per user rank), built at their first use: the plan
# is shared by every layer of a batch, and so are they.
_SEGMENT_ROUTING: "weakref.WeakKeyDictionary[RoutingPlan, dict]" = weakref.WeakKeyDictionary()


def _routing(variant: str, ids: Optional[Tensor], plan: Optional[RoutingPlan], N: int, r_u: int) -> _Routing:
    if ids is None or N == 0:
        return _Routing("wide", None, 0)
    if variant == "wide":
        return _Routing("wide", ids, N)
    if plan is None:
        plan = RoutingPlan(ids, N, check=False)
    cache = _SEGMENT_ROUTING.setdefault(plan, {})
    if r_u not in cache:
        cache[r_u] = _segment_routing(plan, ids, r_u)
    return cache[r_u]


def _segment_routing(plan: RoutingPlan, ids: Tensor, r_u: int) -> _Routing:
    """The segment layout of a batch. Tiles take the layout that moves the fewest
    floats (per unit of d_in + d_out) of three: one tile per user of the bank (N
    tiles of the longest run, inactive users all padding; the weights are read in
    place), one per active user (their weights gathered: 2 r_u per tile), or the runs
    cut at the mean run (at most twice as many tiles, for a skewed batch)."""
    segs = plan.segments()  # (user, start, end) of the active users: the plan's host sync
    T, N, dev = plan.num_tokens, plan.num_users, ids.device
    if not segs:
        return _Routing("segment", ids, N)
    if segs[0][1] == 0 and len(segs) == 1:
        return _Routing("segment", ids, N, user=segs[0][0])
    n_user, A = T - segs[0][1], len(segs)
    longest, mean = max(e - s for _, s, e in segs), -(-n_user // A)
    n_split = sum(-(-(e - s) // mean) for _, s, e in segs)
    layout = min((N * longest, "bank"), (A * longest + 2 * A * r_u, "active"),
                 (n_split * mean + 2 * n_split * r_u, "split"))[1]
    if layout == "bank":
        L, off = longest, plan.seg_offsets.long()
        starts, ends, users = off[1:-1].unsqueeze(1), off[2:].unsqueeze(1), None
    else:
        L = longest if layout == "active" else mean
        tiles = torch.tensor([(u, p, min(p + L, e)) for u, s, e in segs for p in range(s, e, L)], device=dev)
        starts, ends, users = tiles[:, 1:2], tiles[:, 2:3], tiles[:, 0]
    pos = starts + torch.arange(L, device=dev)
    valid = pos < ends
    rows = plan.order.long()[pos.clamp(max=T - 1).view(-1)]
    mask = None if bool(valid.all()) else valid.unsqueeze(-1).to(torch.float32)
    return _Routing("segment", ids, N, -1, pos.shape[0], L, rows, mask, users)


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


def _cast(t: Optional[Tensor], cd: torch.dtype) -> Optional[Tensor]:
    return t if (t is None or t.dtype == cd) else t.to(cd)


def _one_hot(rt: _Routing, cd: torch.dtype) -> Optional[Tensor]:
    """[T, N] in cd, 1 where token t belongs to user n (rows of id -1 are zero); None
    when one user owns the batch."""
    if rt.user >= 0:
        return None
    return (rt.ids.unsqueeze(1) == torch.arange(rt.N, device=rt.ids.device)).to(cd)


def _cols(B: Tensor) -> Tensor:
    """B [M, d_out, r] -> [d_out, M r]: M stacked LoRA up-projections as one matrix."""
    return B.permute(1, 0, 2).reshape(B.shape[1], -1)


def _shrink(A_g: Optional[Tensor], W_r: Optional[Tensor], A_u: Optional[Tensor]) -> Tensor:
    """[K r + K + n r_u, d_in]: the rows present of [A_cat; W_r; A_u of n users]."""
    rows = [t.reshape(-1, t.shape[-1]) for t in (A_g, W_r, A_u) if t is not None]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _forward(x, weight, bias, ad: Adapters, rt: _Routing, d_out: int, save: bool):
    """(y [T, d_out] in x.dtype, h [T, K r], z [T, r_u], g [T, K]); the codes in the
    compute dtype, h and z None unless ``save``."""
    cd = compute_dtype(x.dtype)
    A_g, B_g, W_r = [_cast(t, cd) for t in (ad.expert_A, ad.expert_B, ad.router_weight)]
    # The user tensors are cast once cut to the users the batch reads (below).
    c, A_u, B_u, V = ad.user_logit_bias, ad.user_A, ad.user_B, ad.user_router
    xc = _cast(x, cd)
    T = xc.shape[0]
    K, r = ad.num_experts, ad.expert_rank
    r_u = A_u.shape[1] if A_u is not None else 0
    if weight is not None:
        y = F.linear(xc, _cast(weight, cd), _cast(bias, cd))
    else:
        y = xc.new_zeros(T, d_out) if bias is None else _cast(bias, cd).expand(T, d_out).clone()
    if rt.wide:  # the users' rows: all N, or the one user's
        n = 1 if rt.user >= 0 else rt.N
        sl = slice(rt.user, rt.user + 1) if rt.user >= 0 else slice(None)
        A_u, B_u, c, V = [_cast(t[sl], cd) if t is not None else None for t in (A_u, B_u, c, V)]
        onehot = _one_hot(rt, cd)
    h = logits = z = zw = zp = None
    A_wide = A_u if rt.wide else None
    if K or A_wide is not None:
        H = xc @ _shrink(A_g, W_r, A_wide).t()  # [T, K r + K + n r_u]
        h = H[:, : K * r]
        if W_r is not None:
            logits = H[:, K * r: K * r + K]
    if rt.wide:
        if A_u is not None:
            zw = H[:, H.shape[1] - n * r_u:]
            if onehot is not None:  # each token keeps its own user's r_u columns
                zw = zw.view(T, n, r_u).mul_(onehot.unsqueeze(-1)).view(T, n * r_u)
            if save:
                z = zw.view(T, n, r_u).sum(1) if n > 1 else zw.contiguous()
        if K and c is not None:
            if onehot is not None:
                logits = torch.addmm(logits, onehot, c) if logits is not None else onehot @ c
            else:
                logits = logits + c if logits is not None else c.expand(T, K)
        if K and V is not None:
            Vm = V.transpose(1, 2).reshape(n * r_u, K)
            logits = torch.addmm(logits, zw, Vm) if logits is not None else zw @ Vm
    elif rt.G:  # tiles
        mask = _cast(rt.mask, cd)
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
        y.addmm_(hg, _cols(B_g).t(), alpha=ad.expert_scale)
    else:
        g = xc.new_zeros(T, 0)
    if zw is not None:
        y.addmm_(zw, _cols(B_u).t(), alpha=ad.user_scale)
    elif zp is not None:
        _untile_add(y, torch.bmm(zp, _per_tile(B_u, rt, cd).transpose(1, 2)), rt, alpha=ad.user_scale)
    if save:
        h = h.contiguous() if h is not None else xc.new_zeros(T, 0)  # not a view keeping all of H alive
        z = z if z is not None else xc.new_zeros(T, r_u)
    return _cast(y, x.dtype), h, z, g


def _backward(dy, dg_ext, x, h, z, g, weight, ad: Adapters, rt: _Routing, needs):
    """The 10 gradients (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV) in the
    compute dtype (None where not needed): the chain rule of rankspace.py."""
    n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V = needs
    cd = compute_dtype(x.dtype)
    A_g, B_g, W_r = [_cast(t, cd) for t in (ad.expert_A, ad.expert_B, ad.router_weight)]
    # The user tensors are cast once cut to the users the batch reads (below).
    c, A_u, B_u, V = ad.user_logit_bias, ad.user_A, ad.user_B, ad.user_router
    xc, dyc = _cast(x, cd), _cast(dy, cd)
    T, d_in = xc.shape
    d_out = dyc.shape[1]
    K, r, N = ad.num_experts, ad.expert_rank, rt.N
    r_u = A_u.shape[1] if A_u is not None else 0
    s_g, s_u = ad.expert_scale, ad.user_scale
    if rt.wide:
        n = 1 if rt.user >= 0 else N
        sl = slice(rt.user, rt.user + 1) if rt.user >= 0 else slice(None)
        A_w, B_w, V_w = [_cast(t[sl], cd) if t is not None else None for t in (A_u, B_u, V)]
        onehot = _one_hot(rt, cd)
    dx = dyc @ _cast(weight, cd) if (n_x and weight is not None) else (xc.new_zeros(T, d_in) if n_x else None)
    dW0 = dyc.t() @ xc if n_w else None
    db = dyc.sum(0) if n_b else None
    dA_g = dB_g = dW_r = dc = dA_u = dB_u = dV = None
    # The code gradients [dh | dl | dz of the wide users] meet the shrink rows
    # [A_cat; W_r; A_u of the wide users] in one GEMM for dx and one for their gradient.
    A_wide = A_w if (rt.wide and A_u is not None and (n_Au or n_x)) else None
    codes = []  # [dh | dl | dz], the blocks present, in the order of the shrink rows
    dl = None
    if K:
        gs = (g * s_g).unsqueeze(-1)
        h3 = h.view(T, K, r)
        e = (dyc @ _cols(B_g)).view(T, K, r)  # B_cat^T dy_t, before the scale and the gates
        if n_Bg:
            dB_g = (dyc.t() @ (h3 * gs).view(T, K * r)).view(d_out, K, r).permute(1, 0, 2)
        dg = (e * h3).sum(-1).mul_(s_g)
        if dg_ext is not None:
            dg = dg + _cast(dg_ext, cd)
        # softmax backward; zero off the top_k set, where g is zero
        dl = g * (dg - (g * dg).sum(-1, keepdim=True))
        codes += [(e * gs).view(T, K * r)] + ([dl] if W_r is not None else [])
    if rt.wide:
        if K and c is not None and n_c:
            dc = _per_user(onehot.t() @ dl if onehot is not None else dl.sum(0, keepdim=True), rt)
        if A_u is not None:
            zw = (z.unsqueeze(1) * onehot.unsqueeze(-1)).view(T, n * r_u) if onehot is not None else z
            if n_Bu:
                dB_u = _per_user((dyc.t() @ zw).mul_(s_u).view(d_out, n, r_u).permute(1, 0, 2), rt)
            if V is not None and n_V:
                dV = _per_user((zw.t() @ dl).view(n, r_u, K).transpose(1, 2), rt)
            if A_wide is not None:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t, in the token's own slot
                if V is not None:
                    dzw = torch.addmm(dl @ V_w.permute(1, 0, 2).reshape(K, n * r_u), dyc, _cols(B_w), alpha=s_u)
                else:
                    dzw = (dyc @ _cols(B_w)).mul_(s_u)
                if onehot is not None:
                    dzw = (dzw.view(T, n, r_u) * onehot.unsqueeze(-1)).view(T, n * r_u)
                codes.append(dzw)
    if codes and (n_x or n_Ag or n_Wr or A_wide is not None):
        D = torch.cat(codes, 1) if len(codes) > 1 else codes[0]
        S = _shrink(A_g, W_r, A_wide)
        if n_x:
            dx.addmm_(D, S)
        if n_Ag or (n_Wr and W_r is not None) or (A_wide is not None and n_Au):
            widths = [K * r, K if W_r is not None else 0, n * r_u if A_wide is not None else 0]
            dS = (D.t() @ xc).split(widths, dim=0)
            dA_g = dS[0].view(K, r, d_in) if (K and n_Ag) else None
            dW_r = dS[1] if (W_r is not None and n_Wr) else None
            dA_u = _per_user(dS[2].view(n, r_u, d_in), rt) if (A_wide is not None and n_Au) else None
    if not rt.wide and rt.G:  # tiles
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
    @once_differentiable
    def backward(ctx, dy, dg):
        x, h, z, g, weight, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[:10]
        if not any(needs) or (dy is None and (dg is None or g.numel() == 0)):
            return (None,) * 15
        if dy is None:  # only the gates were used
            dy = x.new_zeros(x.shape[0], ctx.d_out)
        ad = Adapters(*tensors, expert_scale=ctx.scales[0], user_scale=ctx.scales[1])
        grads = _backward(dy, dg if g.numel() else None, x, h, z, g, weight, ad, ctx.rt, needs)
        out = [_cast(gr, dt) if need else None for need, gr, dt in zip(needs, grads, ctx.dtypes)]
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
    rt = _routing(variant, user_ids, plan, N, adapters.user_rank)
    tensors = (x, weight, bias) + adapters.tensors()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, g = TorchMixtureFunction.apply(*tensors, rt, float(adapters.expert_scale), float(adapters.user_scale),
                                          adapters.top_k, int(d_out))
    else:
        y, _, _, g = _forward(x, weight, bias, adapters, rt, d_out, save=False)
    return y, (g if adapters.num_experts else None)
