"""The fast path of :func:`proper_kernels.lora_mixture` without GPU kernels (backend "torch").

The rank-space contract of ``proper_kernels.reference.rankspace`` as a few large
GEMMs with a hand-written backward (its chain rule is written out there), instead of
autograd over the reference's per-token gathers. The forward keeps, per token, only
x and the codes ``h = A_cat x`` [K r], ``z = A_u x`` [r_u] and the gates g [K] (wide:
the codes of every user, and the scaled codes the expand met); everything runs in the
compute dtype (float32; float64 stays float64) and each result comes back in its own
tensor's dtype, as the reference does.

The group part is dense (every token, every expert). The user part has two variants:

* ``wide``     every token against every user of the bank: one shrink GEMM over
               [A_cat; A_u of all N users; W_r], a one-hot [T, N] keeping each
               token's own user's r_u columns, one expand GEMM over [B_cat | B_u of
               all users]; the backward likewise. No host sync, no loop, but (N - 1)
               r_u wasted rank columns per token. On the CPU, where the C++ kernels
               are built (csrc/cpu/wide_layer.cpp, the module proper_kernels._cpu),
               the layer is one call that skips that waste: the group part as GEMMs,
               the user part one gathered matrix-vector product per token on its own
               user's rows; with gradients it is one C++ autograd node.
* ``segment``  the tokens grouped by user in the routing plan's sorted order, cut
               into tiles of one user each; every per-user product is one batched
               GEMM over the tiles (a gather of the user tokens before, a scatter
               after). Its cost follows the tokens, not the bank; it needs the
               plan's segment offsets on the host (one sync on CUDA).

One user owning the whole batch needs neither: its terms are plain GEMMs over its own
rows (segment always; wide on the CPU once its waste would matter). The GEMM layouts
of frozen adapter tensors are kept between calls (:func:`_packed`).

:func:`choose_variant` picks one; the dispatch (``proper_kernels.ops.dispatch.
choose_path``) calls it and reports the choice.
"""
from __future__ import annotations

import importlib
import os
import weakref
from functools import partial
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype, gates_from_logits
from .plan import RoutingPlan

__all__ = ["VARIANTS", "choose_variant", "clear_pack_cache", "lora_mixture_torch", "TorchMixtureFunction"]

VARIANTS = ("wide", "segment")

# Wide's one-hot rank space is [T, N (r_u + K)]: beyond this width it is never taken,
# and on the CPU not beyond CPU_WIDE_MAX_RANK (see choose_variant).
WIDE_MAX_RANK = 4096
CPU_WIDE_MAX_RANK = 256
# Wide with one user owning the batch multiplies T (N - 1) r_u (d_in + d_out) times
# by zero: from this many (~50 us of fp32 GEMM on one CPU core) that user's own rows
# run as plain GEMMs instead (on the CPU; measured cpu-small: wide 1.3x faster at
# T = 1, the user's rows 1.5x faster at T = 256).
ONE_USER_MIN_WASTE = 4_000_000


def choose_variant(N: Optional[int], r_u: int, K: int, device: torch.device,
                   traced: bool = False) -> Tuple[str, str]:
    """(variant, reason): "wide" or "segment" for one call of the torch backend.

    Under torch.compile (``traced``) and on CUDA wide, which has no host sync and no
    loop, up to WIDE_MAX_RANK rank columns. On the CPU, where the plan's segment
    offsets cost no device sync, wide only up to CPU_WIDE_MAX_RANK: its cost follows
    the whole bank, segment's the tokens (measured, d_in 256, T 16 to 256: wide
    1.05-1.15x faster at N (r_u + K) = 192, segment 1.4-2.6x faster from 768 on). On
    the CPU one user owning the batch runs as plain GEMMs in either variant.
    """
    if not N or (r_u == 0 and K == 0):
        return "wide", "no user terms"
    width = N * (r_u + K)
    if width > WIDE_MAX_RANK:
        return "segment", f"a large bank: N (r_u + K) = {width} > {WIDE_MAX_RANK}"
    if traced:
        return "wide", "traced by torch.compile: no host sync"
    if device.type == "cpu":
        if width > CPU_WIDE_MAX_RANK:
            return "segment", (f"on the CPU the user terms follow the tokens (N (r_u + K) = {width} > "
                               f"{CPU_WIDE_MAX_RANK}), grouped by the plan's segments")
        return "wide", (f"a small bank on the CPU: N (r_u + K) = {width} <= {CPU_WIDE_MAX_RANK}"
                        + ("; the CPU kernels run its user terms per token" if _cpu_kernels() else ""))
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
    masks: Optional[dict] = None     # wide: (compute dtype, r_u) -> its one-hot masks, built once per routing

    @property
    def wide(self) -> bool:
        """Whether the user terms run in the wide variant (every user of the bank)."""
        return self.variant == "wide" and self.N > 0




def _routing(variant: str, ids: Optional[Tensor], plan: Optional[RoutingPlan], N: int, r_u: int,
             d: int = 0) -> _Routing:
    """The routing of a call; ``d``: d_in + d_out of the layer (wide's waste). The
    routings of a plan (wide, and segment per user rank) are built at their first use
    and kept in the plan: it is shared by every layer of a batch, and so are they."""
    if ids is None or N == 0:
        return _Routing("wide", None, 0)
    if variant == "wide":
        # Traced code keeps no tensors between calls: its masks are built in the graph.
        if plan is None or torch.compiler.is_compiling():
            return _Routing("wide", ids, N, masks={})
        cache = plan.backend_cache
        # On the CPU, where the plan's segments cost no sync, one user owning a batch
        # large enough for wide's waste to matter runs as plain GEMMs over its rows.
        key = "wide"
        if ids.device.type == "cpu" and plan.num_tokens * (N - 1) * r_u * d >= ONE_USER_MIN_WASTE:
            if "segments" not in cache:
                cache["segments"] = plan.segments()
            segs = cache["segments"]
            if len(segs) == 1 and segs[0][1] == 0:
                key = "one-user"
                if key not in cache:
                    cache[key] = _Routing("segment", ids, N, user=segs[0][0])
        if key not in cache:
            cache[key] = _Routing("wide", ids, N, masks={})
        return cache[key]
    if plan is None:
        plan = RoutingPlan(ids, N, check=False)
    cache = plan.backend_cache
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


# --------------------------------------------------------------------------- packed weights
# The GEMM layouts of the adapter tensors ([A_cat; W_r], the up-projections as one
# matrix, the router in rank space), in the compute dtype. Tensors that take no
# gradient (frozen: requires_grad False) keep theirs between calls, rebuilt when the
# tensor changes: another storage or shape, or a new version (every in-place write
# through the tensor or a view of it bumps it). Writes that bypass the version counter
# are not seen: anything done through ``t.data`` (``t.data.copy_(...)``, ``t.data =
# ...``) and collectives writing into the tensor (DistributedDataParallel's broadcast at
# construction, FSDP's all-gather): call clear_pack_cache() after them, or set
# PROPER_KERNELS_PACK_CACHE=0. Trainable tensors are packed once per forward and the
# pack is reused by its backward.
# id(first source) -> (a weak reference to it, {kind: (signature, packs, the sources kept alive)});
# an entry goes with its first source.
_PACKS: dict = {}
_PACK_CACHE = os.environ.get("PROPER_KERNELS_PACK_CACHE", "1") != "0"


def clear_pack_cache() -> None:
    """Drop every cached pack (after writes the version counter does not see)."""
    _PACKS.clear()


def _packed(kind, build, *sources: Optional[Tensor]):
    """build(*sources), cached while every source is frozen and unchanged."""
    if not _PACK_CACHE or torch.compiler.is_compiling():
        return build(*sources)
    present = [t for t in sources if t is not None]
    # The entry keeps the sources' storage alive (below), so a pointer seen again is the
    # same memory: a new version (or shape) is all that can change what it holds, short
    # of what bypasses the counter (see above).
    try:
        sig = [(t.data_ptr(), t._version, t.shape) for t in present if not t.requires_grad]
    except RuntimeError:  # an inference tensor keeps no version
        return build(*sources)
    if len(sig) < len(present):  # some source trains: it changes at every step
        return build(*sources)
    first, key = present[0], id(present[0])
    got = _PACKS.get(key)
    if got is None or got[0]() is not first:
        got = _PACKS[key] = (weakref.ref(first, lambda _, key=key, packs=_PACKS: packs.pop(key, None)), {})
    slot = got[1]
    hit = slot.get(kind)
    if hit is not None and hit[0] == sig:
        return hit[1]
    packs = build(*sources)
    # The sources stay referenced (their storage, no copy) so that their memory cannot
    # be taken by another tensor of the same signature while the entry lives.
    slot[kind] = (sig, packs, [t.detach() for t in present])
    return packs


def _build_shrink(cd: torch.dtype, A_g: Tensor, W_r: Optional[Tensor]) -> Tensor:
    """[K r (+ K), d_in]: the expert down-projections, then the router rows."""
    A = A_g.reshape(-1, A_g.shape[-1])
    return _cast(torch.cat([A, W_r]) if W_r is not None else A, cd)


def _build_cols(cd: torch.dtype, B: Tensor) -> Tensor:
    """B [M, d_out, r] -> [d_out, M r]: M stacked LoRA up-projections as one matrix."""
    return _cast(B.permute(1, 0, 2).reshape(B.shape[1], -1), cd)


def _build_router(cd: torch.dtype, V: Tensor) -> Tensor:
    """V [N, K, r_u] -> [N r_u, K]: the LoRA-aware router over the rank space of all users."""
    return _cast(V.transpose(1, 2).reshape(-1, V.shape[1]), cd)


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
    return _build_shrink(cd, A_g, W_r), _build_cols(cd, B_g)


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


_ARANGE: dict = {}


def _one_hot(rt: _Routing, cd: torch.dtype) -> Optional[Tensor]:
    """[T, N] in cd, 1 where token t belongs to user n (rows of id -1 are zero); None
    when one user owns the batch."""
    if rt.user >= 0:
        return None
    key = (rt.N, rt.ids.device)
    cols = _ARANGE.get(key)
    if cols is None:
        cols = _ARANGE[key] = torch.arange(rt.N, device=rt.ids.device, dtype=rt.ids.dtype)
    return (rt.ids.unsqueeze(1) == cols).to(cd)


# --------------------------------------------------------------------------- wide
def _cpu_kernels() -> bool:
    """Whether the CPU kernels of the wide variant (csrc/cpu/wide_layer.cpp, the module
    proper_kernels._cpu) are built and loaded; imported at the first call."""
    global _CPU_KERNELS
    if _CPU_KERNELS is None:
        try:
            importlib.import_module("proper_kernels._cpu")
            _CPU_KERNELS = hasattr(torch.ops.proper_kernels_cpu, "wide_layer")
        except ImportError:
            _CPU_KERNELS = False
    return _CPU_KERNELS


_CPU_KERNELS: Optional[bool] = None if os.environ.get("PROPER_KERNELS_CPU_KERNELS", "1") != "0" else False


class _Wide(NamedTuple):
    """The operands of the wide variant as torch ops, in the compute dtype. The code
    columns are [h: K r | z: N r_u | l: K] (the blocks present, in this order); the
    expand meets the first two, scaled: [s_g g_k h_k | s_u z in the token's own user
    block]."""

    S: Tensor              # [K r + N r_u (+ K), d_in]   [A_cat; A_u of all users; W_r]
    E: Tensor              # [d_out, K r + N r_u]        [B_cat | B_u of all users]
    V: Optional[Tensor]    # [N r_u, K]                  the LoRA-aware router in rank space
    c: Optional[Tensor]    # [N, K]                      the user logit bias


def _wide_weights(cd: torch.dtype, A_g, B_g, W_r, c, A_u, B_u, V) -> _Wide:
    rows = [t.reshape(-1, t.shape[-1]) for t in (A_g, A_u, W_r) if t is not None]
    cols = [_build_cols(cd, B) for B in (B_g, B_u) if B is not None]
    S = _cast(torch.cat(rows) if len(rows) > 1 else rows[0], cd)
    E = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    return _Wide(S, E, _build_router(cd, V) if V is not None else None, _cast(c, cd))


def _wide_pack(ad: Adapters, cd: torch.dtype) -> _Wide:
    """The wide operands of these adapters for the torch ops (cached while frozen)."""
    return _packed(("wide", cd), partial(_wide_weights, cd), *ad.tensors())


class _Kernel(NamedTuple):
    """The operands of the CPU kernels (csrc/cpu/wide_layer.cpp) in the compute dtype,
    contiguous; None where absent. The user tensors keep their own layouts (no copy
    when they are already so)."""

    Sg: Optional[Tensor]   # [K r (+ K), d_in]   [A_cat; W_r]
    Eg: Optional[Tensor]   # [d_out, K r]        B_cat
    Au: Optional[Tensor]   # [N, r_u, d_in]
    Bu: Optional[Tensor]   # [N, d_out, r_u]
    V: Optional[Tensor]    # [N, K, r_u]
    c: Optional[Tensor]    # [N, K]


def _kernel_weights(cd: torch.dtype, transposed: bool, A_g, B_g, W_r, c, A_u, B_u, V) -> _Kernel:
    Sg, Eg = torch.ops.proper_kernels_cpu.wide_pack(A_g, B_g, W_r, cd) if A_g is not None else (None, None)
    Au, V, c = (_cast(t, cd).contiguous() if t is not None else None for t in (A_u, V, c))
    if B_u is not None:  # transposed: a view [N, d_out, r_u] of each user's B_u^T, contiguous
        B_u = _cast(B_u, cd).transpose(1, 2).contiguous().transpose(1, 2) if transposed else _cast(B_u, cd).contiguous()
    return _Kernel(Sg, Eg, Au, B_u, V, c)


def _kernel_pack(ad: Adapters, cd: torch.dtype, transposed: bool = False) -> _Kernel:
    """The CPU kernels' operands of these adapters (cached while frozen). ``transposed``:
    B_u as the inference kernel reads it best, each user's B_u^T contiguous."""
    return _packed(("kernel", cd, transposed), _KERNEL_BUILDERS[cd, transposed], *ad.tensors())


_KERNEL_BUILDERS = {(cd, tr): partial(_kernel_weights, cd, tr)
                    for cd in (torch.float32, torch.float64) for tr in (False, True)}


def _wide_masks(rt: _Routing, cd: torch.dtype, r_u: int) -> Tuple[Tensor, Optional[Tensor]]:
    """(one-hot [T, N], its columns repeated r_u times [T, N r_u] or None) in cd:
    token t's row is 1 on its own user (zero for id -1)."""
    key = (cd, r_u)
    if key not in rt.masks:
        onehot = _one_hot(rt, cd)
        masks = (onehot, onehot.repeat_interleave(r_u, dim=1) if r_u else None)
        if torch.compiler.is_compiling():  # traced: no tensor kept outside the graph
            return masks
        rt.masks[key] = masks
    return rt.masks[key]


def _ids32(rt: _Routing) -> Tensor:
    """The routing's ids as the CPU kernels read them: int32, contiguous."""
    if "ids32" not in rt.masks:
        rt.masks["ids32"] = rt.ids.to(torch.int32).contiguous()
    return rt.masks["ids32"]


def _native_autograd(x: Tensor, ad: Adapters, tensors) -> bool:
    """Whether a wide call with gradients runs as the CPU kernels' own autograd node:
    they are built, x is a CPU float32/float64 tensor, every tensor has x's dtype (the
    compute dtype: no conversion to differentiate), the kernels can read the user
    tensors in place (contiguous), and nothing traces the call."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not _cpu_kernels():
        return False
    return (not torch.compiler.is_compiling() and all(t is None or t.dtype == x.dtype for t in tensors)
            and all(t is None or t.is_contiguous() for t in (ad.user_logit_bias, ad.user_A, ad.user_B, ad.user_router)))


def _mul_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out = a * b, written into ``out`` (a column block of a wider tensor)."""
    if torch.compiler.is_compiling():  # dynamo takes no strided out=
        return out.copy_(a * b)
    return torch.mul(a, b, out=out)


def _forward_wide(x, weight, bias, ad: Adapters, rt: _Routing, d_out: int, save: bool):
    """The wide variant: every token against every user of the bank. As torch ops: one
    shrink GEMM H = x S^T gives the codes of all experts and users and the router's
    logits; each token keeps its own user's codes (a one-hot mask), the gates scale the
    expert codes (HG); one expand GEMM adds them to the base output. Without gradients
    on the CPU with the kernels built, the layer is one call that skips the masked
    zeros (the user terms per token, on its own user's rows).

    Returns (y in x.dtype, g [T, K], saved for the backward or None)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not save and x.device.type == "cpu" and _cpu_kernels() and not torch.compiler.is_compiling():
        k = _kernel_pack(ad, cd, transposed=True)
        A_g, A_u = ad.expert_A, ad.user_A
        y, _, _, _, g = torch.ops.proper_kernels_cpu.wide_layer_forward(
            _cast(x, cd), _cast(weight, cd), _cast(bias, cd), k.Sg, k.Eg, k.Au, k.Bu, _ids32(rt), k.c, k.V,
            A_g.shape[0] if A_g is not None else 0, A_g.shape[1] if A_g is not None else 0,
            A_u.shape[1] if A_u is not None else 0, rt.N, d_out, ad.router_weight is not None, ad.top_k or 0,
            ad.expert_scale, ad.user_scale, True)
        return (y if y.dtype == x.dtype else y.to(x.dtype)), g, None
    xc = _cast(x, cd)
    T = xc.shape[0]
    K, r = ad.num_experts, ad.expert_rank
    A_u = ad.user_A
    r_u = A_u.shape[1] if A_u is not None else 0
    s_g, s_u = ad.expert_scale, ad.user_scale
    w = _wide_pack(ad, cd)
    Kr, R = K * r, w.E.shape[1]  # R: the expanded code columns, K r + N r_u
    if weight is not None:
        y = F.linear(xc, _cast(weight, cd), _cast(bias, cd))
    else:
        y = xc.new_zeros(T, d_out) if bias is None else _cast(bias, cd).expand(T, d_out).clone()
    H = F.linear(xc, w.S)
    onehot, zmask = _wide_masks(rt, cd, r_u)
    HG = torch.empty(T, R, dtype=cd, device=xc.device)  # the codes as the expand reads them
    zw = _mul_into(HG[:, Kr:], H[:, Kr:R], zmask) if r_u else None
    g = xc.new_zeros(T, 0)
    if K:
        logits = H[:, R:] if ad.router_weight is not None else None
        if w.c is not None:
            logits = torch.addmm(logits, onehot, w.c) if logits is not None else onehot @ w.c
        if w.V is not None:
            logits = torch.addmm(logits, zw, w.V) if logits is not None else zw @ w.V
        g = gates_from_logits(logits if logits is not None else xc.new_zeros(T, K), ad.top_k)
        _mul_into(HG[:, :Kr].view(T, K, r), H[:, :Kr].view(T, K, r), (g * s_g).unsqueeze(-1))
    if r_u and s_u != 1.0:
        zw.mul_(s_u)
    y.addmm_(HG, w.E.t())
    return _cast(y, x.dtype), g, ((H, HG, g, w) if save else None)


def _backward_wide(dy, dg_ext, x, weight, ad: Adapters, rt: _Routing, saved, needs):
    """The chain rule of rankspace.py for the wide variant as torch ops, on the codes
    of the forward: the 10 gradients in the compute dtype (None where not needed)."""
    n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V = needs
    H, HG, g, w = saved
    cd = compute_dtype(x.dtype)
    xc, dyc = _cast(x, cd), _cast(dy, cd)
    T, d_in = xc.shape
    d_out = dyc.shape[1]
    K, r, N = ad.num_experts, ad.expert_rank, rt.N
    A_u = ad.user_A
    r_u = A_u.shape[1] if A_u is not None else 0
    s_g, s_u = ad.expert_scale, ad.user_scale
    Kr, R = K * r, w.E.shape[1]
    has_router = ad.router_weight is not None
    need_dc, need_dV = bool(n_c and w.c is not None), bool(n_V and w.V is not None)
    dc = dV = dx = dS = dE = dl = None
    if n_Bg or n_Bu:  # HG holds the scaled codes the expand met: dE = dy^T HG
        dE = dyc.t() @ HG
    e = dyc @ w.E  # [T, K r + N r_u]: B_cat^T dy | B_u^T dy of every user (unscaled)
    onehot, zmask = _wide_masks(rt, cd, r_u)
    dH = torch.empty(T, H.shape[1], dtype=cd, device=xc.device)  # the gradient of the codes H
    if K:
        e3 = e[:, :Kr].view(T, K, r)
        dg = (e3 * H[:, :Kr].view(T, K, r)).sum(-1).mul_(s_g)
        if dg_ext is not None:
            dg = dg + _cast(dg_ext, cd)
        # softmax backward; zero off the top_k set, where g is zero
        dl = g * (dg - (g * dg).sum(-1, keepdim=True))
        _mul_into(dH[:, :Kr].view(T, K, r), e3, (g * s_g).unsqueeze(-1))
        if has_router:
            dH[:, R:].copy_(dl)
        if need_dc:
            dc = onehot.t() @ dl
        if need_dV:  # the unscaled masked codes: H's user columns times the mask
            dV = ((H[:, Kr:R] * zmask).t() @ dl).view(N, r_u, K).transpose(1, 2)
    if r_u:  # dz_t = s_u B_u^T dy_t + V_u^T dl_t, in the token's own slot
        dz = torch.addmm(e[:, Kr:], dl, w.V.t(), beta=s_u) if w.V is not None else e[:, Kr:].mul(s_u)
        _mul_into(dH[:, Kr:R], dz, zmask)
    if n_x:
        dx = (dyc @ _cast(weight, cd) if weight is not None else xc.new_zeros(T, d_in)).addmm_(dH, w.S)
    if n_Ag or n_Au or (n_Wr and has_router):
        dS = dH.t() @ xc
    return (dx, dyc.t() @ xc if n_w else None, dyc.sum(0) if n_b else None,
            dS[:Kr].view(K, r, d_in) if (n_Ag and K) else None,
            dE[:, :Kr].view(d_out, K, r).permute(1, 0, 2) if (n_Bg and K) else None,
            dS[R:] if (n_Wr and has_router) else None, dc,
            dS[Kr:R].view(N, r_u, d_in) if (n_Au and r_u) else None,
            dE[:, Kr:].view(d_out, N, r_u).permute(1, 0, 2) if (n_Bu and r_u) else None, dV)


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
    r_u = A_u.shape[1] if A_u is not None else 0
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


class TorchMixtureFunction(torch.autograd.Function):
    """Autograd of the torch backend: the forward saves x and the codes (h, z, g),
    the backward applies the chain rule of ``proper_kernels.reference.rankspace``
    (written out there for every tensor) as a few GEMMs. The gates stay
    differentiable: their gradient (e.g. from the balance loss) joins dg before the
    softmax backward. Arguments: the 10 tensors of the op in the order of its
    gradients, then the routing, the scales, top_k, d_out and whether the gates are an
    output (y alone otherwise: one output less for autograd to track)."""

    @staticmethod
    def forward(ctx, x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B,
                user_router, rt, expert_scale, user_scale, top_k, d_out, with_gates):
        ad = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                      expert_scale, user_scale, top_k)
        if rt.wide:
            y, g, (H, HG, g, w) = _forward_wide(x, weight, bias, ad, rt, d_out, save=True)
            ctx.save_for_backward(x, H, HG, g, weight, *ad.tensors())
        else:
            y, h, z, g, w = _forward_segment(x, weight, bias, ad, rt, d_out, save=True)
            ctx.save_for_backward(x, h, z, g, weight, *ad.tensors())
        # The GEMM operands are packed once, for the forward and its backward (traced
        # code keeps no tensor outside the graph: the backward packs them again).
        ctx.rt, ctx.scales, ctx.d_out = rt, (expert_scale, user_scale), d_out
        ctx.w = None if torch.compiler.is_compiling() else w
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias) + ad.tensors()]
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return (y, g) if with_gates else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dg=None):
        x, c1, c2, g, weight, *tensors = ctx.saved_tensors  # the codes: (H, HG) wide, (h, z) segment
        needs = ctx.needs_input_grad[:10]
        if not any(needs) or (dy is None and (dg is None or g.numel() == 0)):
            return (None,) * 16
        if dy is None:  # only the gates were used
            dy = x.new_zeros(x.shape[0], ctx.d_out)
        ad = Adapters(*tensors, expert_scale=ctx.scales[0], user_scale=ctx.scales[1])
        dg = dg if g.numel() else None
        w = ctx.w
        if ctx.rt.wide:
            if w is None:
                w = _wide_pack(ad, compute_dtype(x.dtype))
            grads = _backward_wide(dy, dg, x, weight, ad, ctx.rt, (c1, c2, g, w), needs)
        else:
            grads = _backward_segment(dy, dg, x, c1, c2, g, weight, ad, ctx.rt,
                                      w if w is not None else _weights(ad, ctx.rt, compute_dtype(x.dtype)), needs)
        out = [_cast(gr, dt) if need else None for need, gr, dt in zip(needs, grads, ctx.dtypes)]
        return (*out,) + (None,) * 6


def lora_mixture_torch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Adapters,
                       user_ids: Optional[Tensor], *, d_out: int, num_users: Optional[int] = None,
                       plan: Optional[RoutingPlan] = None, variant: str = "wide", gates: bool = True,
                       needs_grad: Optional[bool] = None):
    """The torch backend on validated 2-D inputs.

    Args:
        x: [T, d_in]; weight, bias, adapters: as in :func:`proper_kernels.lora_mixture`.
        user_ids: [T] int in [-1, N) (None when no tensor is indexed by user).
        d_out: the output size. num_users: N (default: from the adapters).
        plan: the RoutingPlan of user_ids, read by the segment variant (built here
            when None). variant: "wide" or "segment" (see :func:`choose_variant`).
        gates: return the gates (False: None in their place, and y the only output
            autograd tracks).
        needs_grad: whether a gradient is needed (grad mode on and some tensor
            requires it), when the caller knows; found out here when None.

    Returns:
        (y [T, d_out] in x.dtype, gates [T, K] in the compute dtype or None without
        experts), differentiable in every tensor.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    N = num_users if num_users is not None else (adapters.num_users or 0)
    rt = _routing(variant, user_ids, plan, N, adapters.user_rank, x.shape[1] + d_out)
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias) + adapters.tensors())
    if needs_grad:
        tensors = (x, weight, bias) + adapters.tensors()
        if rt.wide and _native_autograd(x, adapters, tensors):  # the layer and its backward: one C++ autograd node
            k = _kernel_pack(adapters, x.dtype)
            y, g = torch.ops.proper_kernels_cpu.wide_layer(
                *tensors, k.Sg, k.Eg, _ids32(rt), adapters.num_experts, adapters.expert_rank,
                adapters.user_rank, N, int(d_out), adapters.top_k or 0, float(adapters.expert_scale),
                float(adapters.user_scale))
            return y, (g if (gates and adapters.num_experts) else None)
        out = TorchMixtureFunction.apply(*tensors, rt, float(adapters.expert_scale), float(adapters.user_scale),
                                         adapters.top_k, int(d_out), gates)
        y, g = out if gates else (out, None)
    else:
        if rt.wide:
            y, g, _ = _forward_wide(x, weight, bias, adapters, rt, d_out, save=False)
        else:
            y, _, _, g, _ = _forward_segment(x, weight, bias, adapters, rt, d_out, save=False)
    return y, (g if (gates and adapters.num_experts) else None)
