"""Triton fused forward of one PROPER-adapted linear.

The math is the reference's (``proper_kernels.reference.mixture``) in the rank-space
form of ``proper_kernels.reference.rankspace``: y_t = W0 x_t + b + s_g B_cat (G_t * h_t)
+ s_u B_u z_t with h_t = A_cat x_t, z_t = A_u x_t and the gates g_t.
(A_cat = A_g stacked to [K r, d_in], B_cat = B_g stacked to [d_out, K r], G_t = g_t
repeated r times.) The launcher :func:`mixture_fwd` returns (y, h, z, g): the output
and the rank-space codes the backward reads. No [T, K, d] tensor is ever built.

Two kernels, two launches:

* ``_mixture_shrink_kernel``: one read of x against [A_cat; W_r; A_u(t)], fp32
  accumulators h [BM, K r], l [BM, K], z [BM, r_u]; writes h and z. Grid (cdiv(T, BM),
  SPLIT_K). With SPLIT_K = 1 (prefill) it also finishes the gates in registers
  (l += c_u + V_u z, top_k, softmax), writes g and the scaled gated codes s_g G*h in
  the dot dtype. With SPLIT_K > 1 (decode) each program reduces a slice of d_in and
  atomically adds h, z and the raw router logits W_r x into zeroed fp32 buffers
  (with three or more slices the order of those fp32 additions is not fixed, so
  decode outputs are not bitwise reproducible run to run).
* ``_mixture_expand_kernel``: per (token tile, d_out tile): after a split-K shrink it
  finishes the gates from W_r x (the programs of the first d_out tile write g), then
  y tile = [s_g G*h | s_u z] [B_cat | B_u(t)]^T, plus the base. The base is
  either computed in the same kernel (variant "fused": the d_in loop of the base
  GEMM runs first and the rank-space expand is appended to its accumulator,
  LoRAFusion style), or read from y, which torch's GEMM wrote (variant
  "standalone"), or absent (variant "mixture": no W0, y = b + mixture).

Token tiles. Tokens are visited in the routing plan's sorted order (``order``, a
stable sort of token indices by user): tile i is sorted positions [i BM, (i+1) BM),
rows are gathered by index (x is never permuted; the launcher makes a
non-contiguous x contiguous once). A tile may hold several
users; the user terms loop over the distinct users present in the tile (a ``while``
over the sorted ids), each loading its A_u / V_u / B_u block once and applying it to
its own rows through a row mask. Each user's adapter is therefore read once per tile
column, no tile is wasted on segment remainders (which matters when the base GEMM
runs in the same tiles), and the grid depends on T only: no host sync, and T, the
user counts and the plan are runtime values, never constexprs (no recompilation per
batch). d_in, d_out, K, r, r_u, top_k are constexprs or masked runtime sizes.

Regimes and variants are picked in one place each, in ``fwd_config.py``:
:func:`fwd_config` (launch configs keyed on a T bucket, the dims, the rank, the dot
dtype and the compute capability) and :func:`forward_variant`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.adapters import Adapters
from ..runtime.target import device_arch
from .fwd_config import DECODE_MAX_T, FwdConfig, _interpret, forward_variant, fwd_config

__all__ = ["mixture_fwd", "forward_variant", "fwd_config", "FwdConfig", "DECODE_MAX_T"]

_BIG = tl.constexpr(2147483647)  # 'no user' sentinel of the user loops


def _pad16(n: int) -> int:
    """tl.dot needs every block dim >= 16 (and a power of two): pad and mask."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# ---------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------


@triton.jit
def _tile_rows(order_ptr, uid_ptr, T, pid_m, BLOCK_M: tl.constexpr, HAS_USERS: tl.constexpr):
    """Rows of token tile pid_m: (token index int64, user id, row valid, first user,
    last user). Rows are sorted positions pid_m*BM + i, mapped to tokens through
    ``order``; without users the tile is the tokens themselves and every id is -1."""
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < T
    if HAS_USERS:
        tok = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
        uid = tl.load(uid_ptr + tok, mask=row_ok, other=-1).to(tl.int32)
    else:
        tok = pos.to(tl.int64)
        uid = tl.full([BLOCK_M], -1, tl.int32)
    # The ids of a tile are sorted, so its users are the distinct values between
    # these two; the user loops walk them with "next larger id present".
    u_first = tl.min(tl.where(row_ok & (uid >= 0), uid, _BIG), axis=0)
    u_last = tl.max(tl.where(row_ok, uid, -1), axis=0)
    return tok, uid, row_ok, u_first, u_last


@triton.jit
def _next_user(uid, row_ok, u):
    return tl.min(tl.where(row_ok & (uid > u), uid, _BIG), axis=0)


@triton.jit
def _gates(lg, z, uid, row_ok, u_first, u_last, c_ptr, v_ptr,
           stride_cn, stride_ck, stride_vn, stride_vk, stride_vr,
           K: tl.constexpr, RU: tl.constexpr, K_PAD: tl.constexpr, RU_PAD: tl.constexpr,
           TOP_K: tl.constexpr, HAS_USER_BIAS: tl.constexpr, HAS_USER_ROUTER: tl.constexpr,
           BLOCK_M: tl.constexpr):
    """g [BM, K_PAD] from the router logits lg = W_r x: adds c_u and V_u z (one V_u
    block per user of the tile), then top_k / softmax in registers."""
    offs_e = tl.arange(0, K_PAD)
    offs_ru = tl.arange(0, RU_PAD)
    e_ok = offs_e[None, :] < K
    if HAS_USER_BIAS:
        has_u = row_ok & (uid >= 0)
        lg += tl.load(c_ptr + tl.maximum(uid, 0).to(tl.int64)[:, None] * stride_cn + offs_e[None, :] * stride_ck,
                      mask=has_u[:, None] & e_ok, other=0.0).to(tl.float32)
    if HAS_USER_ROUTER:
        u = u_first
        while u <= u_last:
            vt = tl.load(v_ptr + u.to(tl.int64) * stride_vn + offs_e[None, :] * stride_vk
                         + offs_ru[:, None] * stride_vr,
                         mask=e_ok & (offs_ru[:, None] < RU), other=0.0).to(tl.float32)
            part = tl.dot(z, vt, input_precision="ieee")
            lg += tl.where((uid == u)[:, None], part, 0.0)
            u = _next_user(uid, row_ok, u)
    return _softmax_gates(lg, e_ok, offs_e, BLOCK_M, K_PAD, TOP_K)


@triton.jit
def _repeat_gates(g, R: tl.constexpr, K_PAD: tl.constexpr, KR_PAD: tl.constexpr):
    """G [BM, KR_PAD], G[:, c] = g[:, c // r], as an exact one-hot product (registers
    cannot be gathered): onehot[k, c] = (c // r == k), an IEEE fp32 dot."""
    offs_e = tl.arange(0, K_PAD)
    offs_kr = tl.arange(0, KR_PAD)
    onehot = tl.where(offs_kr[None, :] // R == offs_e[:, None], 1.0, 0.0)
    return tl.dot(g, onehot, input_precision="ieee")


@triton.jit
def _mixture_shrink_kernel(
    x_ptr, a_ptr, wr_ptr, au_ptr, order_ptr, uid_ptr, c_ptr, v_ptr,
    h_ptr, l_ptr, z_ptr, g_ptr, hg_ptr,
    T, D_IN, K_PER_SPLIT, s_g,
    stride_xt, stride_xd,
    stride_ar, stride_ad,
    stride_wk, stride_wd,
    stride_aun, stride_aur, stride_aud,
    stride_ht, stride_lt, stride_zt, stride_gt, stride_hgt,
    stride_cn, stride_ck, stride_vn, stride_vk, stride_vr,
    R: tl.constexpr, KR: tl.constexpr, K: tl.constexpr, RU: tl.constexpr,
    KR_PAD: tl.constexpr, K_PAD: tl.constexpr, RU_PAD: tl.constexpr, TOP_K: tl.constexpr,
    HAS_EXPERTS: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_USER_A: tl.constexpr,
    HAS_USER_BIAS: tl.constexpr, HAS_USER_ROUTER: tl.constexpr,
    HAS_USERS: tl.constexpr, ATOMIC: tl.constexpr, GATES: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h = x A_cat^T [T, KR], l = x W_r^T [T, K], z = A_u(t) x [T, RU] over one d_in slice.

    GATES (no split-K): also finish the gates here, write g and the scaled gated
    codes s_g G*h (in the dot dtype) for the expand, and skip l."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok, uid, row_ok, u_first, u_last = _tile_rows(order_ptr, uid_ptr, T, pid_m, BLOCK_M, HAS_USERS)

    offs_k = tl.arange(0, BLOCK_K)
    offs_kr = tl.arange(0, KR_PAD)
    offs_e = tl.arange(0, K_PAD)
    offs_ru = tl.arange(0, RU_PAD)
    h = tl.zeros([BLOCK_M, KR_PAD], dtype=tl.float32)
    lg = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    z = tl.zeros([BLOCK_M, RU_PAD], dtype=tl.float32)

    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, D_IN)
    x_rows = x_ptr + tok[:, None] * stride_xt
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_end
        xt = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xt = xt.to(DOT_DTYPE)
        if HAS_EXPERTS:
            # A_cat^T block [BK, KR_PAD]: every expert's rows at once (rank K r).
            at = tl.load(a_ptr + offs_kr[None, :] * stride_ar + kk[:, None] * stride_ad,
                         mask=(offs_kr[None, :] < KR) & k_ok[:, None], other=0.0)
            h = tl.dot(xt, at.to(DOT_DTYPE), h, input_precision=PRECISION)
        if HAS_ROUTER:
            wt = tl.load(wr_ptr + offs_e[None, :] * stride_wk + kk[:, None] * stride_wd,
                         mask=(offs_e[None, :] < K) & k_ok[:, None], other=0.0)
            lg = tl.dot(xt, wt.to(DOT_DTYPE), lg, input_precision=PRECISION)
        if HAS_USER_A:
            # The x tile is shared by every user of the tile; each user's A_u block is
            # loaded once and applied to its own rows.
            u = u_first
            while u <= u_last:
                aut = tl.load(au_ptr + u.to(tl.int64) * stride_aun + offs_ru[None, :] * stride_aur
                              + kk[:, None] * stride_aud,
                              mask=(offs_ru[None, :] < RU) & k_ok[:, None], other=0.0)
                part = tl.dot(xt, aut.to(DOT_DTYPE), input_precision=PRECISION)
                z += tl.where((uid == u)[:, None], part, 0.0)
                u = _next_user(uid, row_ok, u)

    rows = tok[:, None]
    if HAS_EXPERTS:
        hp = h_ptr + rows * stride_ht + offs_kr[None, :]
        hm = row_ok[:, None] & (offs_kr[None, :] < KR)
        _write(hp, h, hm, ATOMIC)
    if GATES:
        g = _gates(lg, z, uid, row_ok, u_first, u_last, c_ptr, v_ptr,
                   stride_cn, stride_ck, stride_vn, stride_vk, stride_vr,
                   K, RU, K_PAD, RU_PAD, TOP_K, HAS_USER_BIAS, HAS_USER_ROUTER, BLOCK_M)
        tl.store(g_ptr + rows * stride_gt + offs_e[None, :], g, mask=row_ok[:, None] & (offs_e[None, :] < K))
        hg = h * _repeat_gates(g, R, K_PAD, KR_PAD) * s_g
        tl.store(hg_ptr + rows * stride_hgt + offs_kr[None, :], hg.to(hg_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_kr[None, :] < KR))
    elif HAS_ROUTER:
        lp = l_ptr + rows * stride_lt + offs_e[None, :]
        lm = row_ok[:, None] & (offs_e[None, :] < K)
        _write(lp, lg, lm, ATOMIC)
    if HAS_USER_A:
        zp = z_ptr + rows * stride_zt + offs_ru[None, :]
        zm = row_ok[:, None] & (offs_ru[None, :] < RU)
        _write(zp, z, zm, ATOMIC)


@triton.jit
def _write(ptr, val, mask, ATOMIC: tl.constexpr):
    """Store a tile, or add it into a zeroed buffer when d_in is split (split-K)."""
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


@triton.jit
def _softmax_gates(lg, e_ok, offs_e, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr, TOP_K: tl.constexpr):
    """Row-wise softmax of lg [BM, K_PAD] over the valid experts; with TOP_K > 0 over
    the TOP_K largest only (ties to the lower index, as the reference's stable
    descending sort: torch.topk does not promise it), 0 elsewhere."""
    lg = tl.where(e_ok, lg, float("-inf"))
    if TOP_K > 0:
        keep = tl.zeros([BLOCK_M, K_PAD], dtype=tl.int32)
        for _ in tl.static_range(TOP_K):
            cand = tl.where(keep != 0, float("-inf"), lg)
            m = tl.max(cand, axis=1)
            hit = (cand == m[:, None]) & e_ok & (keep == 0)
            first = tl.min(tl.where(hit, offs_e[None, :], K_PAD), axis=1)
            keep = tl.where(offs_e[None, :] == first[:, None], 1, keep)
        lg = tl.where(keep != 0, lg, float("-inf"))
    m = tl.max(lg, axis=1)
    p = tl.exp(lg - m[:, None])
    p = tl.where(lg == float("-inf"), 0.0, p)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _mixture_expand_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    h_ptr, l_ptr, z_ptr, g_ptr, hg_ptr,
    bg_ptr, bu_ptr, c_ptr, v_ptr,
    order_ptr, uid_ptr,
    T, D_IN, D_OUT, s_g, s_u,
    stride_xt, stride_xd,
    stride_wn, stride_wd,
    stride_yt, stride_yn,
    stride_ht, stride_lt, stride_zt, stride_gt, stride_hgt,
    stride_bgk, stride_bgn, stride_bgr,
    stride_bun, stride_bud, stride_bur,
    stride_cn, stride_ck,
    stride_vn, stride_vk, stride_vr,
    R: tl.constexpr, KR: tl.constexpr, K: tl.constexpr, RU: tl.constexpr,
    KR_PAD: tl.constexpr, K_PAD: tl.constexpr, RU_PAD: tl.constexpr, TOP_K: tl.constexpr,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_Y: tl.constexpr,
    HAS_EXPERTS: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_USER_BIAS: tl.constexpr,
    HAS_USER_B: tl.constexpr, HAS_USER_ROUTER: tl.constexpr, HAS_USERS: tl.constexpr,
    GATED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y tile [BM, BN] = (x W0^T | y | 0) + b + s_g (G*h) B_cat^T + s_u z B_u(t)^T; writes g."""
    # Grouped program order: GROUP_M token tiles share each W0 / B column block in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(D_OUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    tok, uid, row_ok, u_first, u_last = _tile_rows(order_ptr, uid_ptr, T, pid_m, BLOCK_M, HAS_USERS)
    rows = tok[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if HAS_W:
        # The base GEMM: the d_in loop of x W0^T on this tile.
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rows * stride_xt
        w_cols = w_ptr + offs_n[None, :] * stride_wn
        for k0 in range(0, D_IN, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D_IN
            xt = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_cols + kk[:, None] * stride_wd, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    y_ptrs = y_ptr + rows * stride_yt + offs_n[None, :] * stride_yn
    y_mask = row_ok[:, None] & n_ok[None, :]
    if ADD_Y:
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    offs_ru = tl.arange(0, RU_PAD)
    if HAS_USER_B:
        z = tl.load(z_ptr + rows * stride_zt + offs_ru[None, :],
                    mask=row_ok[:, None] & (offs_ru[None, :] < RU), other=0.0)

    if HAS_EXPERTS:
        offs_kr = tl.arange(0, KR_PAD)
        kr_ok = offs_kr < KR
        if GATED:
            # The shrink finished the gates and wrote the scaled gated codes s_g G*h.
            hg = tl.load(hg_ptr + rows * stride_hgt + offs_kr[None, :], mask=row_ok[:, None] & kr_ok[None, :],
                         other=0.0).to(DOT_DTYPE)
        else:
            # Split-K shrink: finish the gates here (l = W_r x + c_u + V_u z); the
            # programs of the first d_out tile write g.
            offs_e = tl.arange(0, K_PAD)
            e_ok = offs_e[None, :] < K
            if HAS_ROUTER:
                lg = tl.load(l_ptr + rows * stride_lt + offs_e[None, :], mask=row_ok[:, None] & e_ok, other=0.0)
            else:
                lg = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
            if HAS_USER_ROUTER:
                zr = z
            else:
                zr = tl.zeros([BLOCK_M, RU_PAD], dtype=tl.float32)
            g = _gates(lg, zr, uid, row_ok, u_first, u_last, c_ptr, v_ptr,
                       stride_cn, stride_ck, stride_vn, stride_vk, stride_vr,
                       K, RU, K_PAD, RU_PAD, TOP_K, HAS_USER_BIAS, HAS_USER_ROUTER, BLOCK_M)
            if pid_n == 0:
                tl.store(g_ptr + rows * stride_gt + offs_e[None, :], g, mask=row_ok[:, None] & e_ok)
            h = tl.load(h_ptr + rows * stride_ht + offs_kr[None, :], mask=row_ok[:, None] & kr_ok[None, :], other=0.0)
            hg = (h * _repeat_gates(g, R, K_PAD, KR_PAD) * s_g).to(DOT_DTYPE)
        # B_cat^T block [KR_PAD, BN]: code c = k r + j reads B_g[k, n, j].
        bgt = tl.load(bg_ptr + (offs_kr // R)[:, None] * stride_bgk + (offs_kr % R)[:, None] * stride_bgr
                      + offs_n[None, :] * stride_bgn,
                      mask=kr_ok[:, None] & n_ok[None, :], other=0.0)
        # Scales ride in the codes, so the rank-space products accumulate straight
        # into the GEMM accumulator (no second BM x BN fp32 tile live).
        acc = tl.dot(hg, bgt.to(DOT_DTYPE), acc, input_precision=PRECISION)

    if HAS_USER_B:
        zs = z * s_u
        u = u_first
        while u <= u_last:
            but = tl.load(bu_ptr + u.to(tl.int64) * stride_bun + offs_ru[:, None] * stride_bur
                          + offs_n[None, :] * stride_bud,
                          mask=(offs_ru[:, None] < RU) & n_ok[None, :], other=0.0)
            # Only this user's rows of the code take part (the others are zeroed).
            zu = tl.where((uid == u)[:, None], zs, 0.0).to(DOT_DTYPE)
            acc = tl.dot(zu, but.to(DOT_DTYPE), acc, input_precision=PRECISION)
            u = _next_user(uid, row_ok, u)

    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------------------------
# Launcher.
# ---------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _strides(t: Optional[Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def mixture_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    adapters: Adapters,
    user_ids: Optional[Tensor],
    order: Optional[Tensor],
    d_out: int,
    *,
    variant: Optional[str] = None,
    config: Optional[FwdConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: x [T, d_in] -> (y [T, d_out] x.dtype, h [T, K r], z [T, r_u], g [T, K]).

    Args (any adapter tensor may be None; its output is then [T, 0]):
        x:        [T, d_in] fp16 / bf16 / fp32; a non-contiguous x is copied to a
                  contiguous one (parameters are read through their strides; bias,
                  and an expert_A that cannot be viewed as [K r, d_in], are copied).
        weight, bias: W0 [d_out, d_in], b [d_out].
        adapters: the layer's :class:`~proper_kernels.reference.adapters.Adapters`.
        user_ids: [T] int32 (-1 = no user); order: [T] int32 token indices sorted by
                  user (a RoutingPlan's). Both None when no tensor is indexed by user.
        variant, config: overrides of :func:`forward_variant` / :func:`fwd_config` (tests).

    h, z, g are float32 (h ungated); rows of z for user -1 are zero. Mutates nothing.
    The dispatch sends only fp16 / bf16 / fp32 here.
    """
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton forward kernels take float16, bfloat16 or float32 x, got {x.dtype}")
    (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
     expert_scale, user_scale, top_k) = adapters
    x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it with unit stride
    T, d_in = x.shape
    dev = x.device
    f32 = torch.float32
    has_e = expert_A is not None
    K, r = (expert_A.shape[0], expert_A.shape[1]) if has_e else (0, 0)
    KR = K * r
    r_u = user_A.shape[1] if user_A is not None else 0
    r_u_out = r_u  # z is [T, r_u] whenever user_A is given (zeros without ids)
    has_users = order is not None and user_ids is not None
    if not has_users:  # without ids no user term can apply
        user_A = user_B = user_logit_bias = user_router = None
        r_u = 0
    if top_k is not None and (not has_e or top_k >= K):
        top_k = None

    params = [t for t in (weight, bias, expert_A, expert_B, router_weight, user_logit_bias,
                          user_A, user_B, user_router) if t is not None]
    same = all(t.dtype == x.dtype for t in params)
    if variant is None:
        variant = forward_variant(T, d_in, d_out, has_weight=weight is not None, dtype=x.dtype,
                                  same_dtypes=same, rank=KR + r_u)
    if weight is None:
        variant = "mixture"
    elif variant == "mixture":
        raise ValueError("variant='mixture' needs weight=None")
    dot_dtype = _TL_DTYPES[x.dtype] if same else tl.float32
    cfg = config or fwd_config(T, d_in, d_out, KR + r_u, variant, dtype=x.dtype if same else torch.float32,
                               arch=device_arch(dev))
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"

    y = torch.empty(T, d_out, device=dev, dtype=x.dtype)
    g = torch.empty(T, K, device=dev, dtype=f32)
    if T == 0:
        return y, x.new_empty(0, KR, dtype=f32), x.new_empty(0, r_u_out, dtype=f32), g
    # Split-K (decode) adds d_in slices into zeroed buffers and leaves the gates to the
    # expand kernel. With d_out = 0 no expand program runs: the shrink then keeps the
    # whole d_in and finishes the gates itself.
    atomic = cfg.split_k > 1 and d_out > 0
    gates_in_shrink = has_e and not atomic
    alloc = torch.zeros if atomic else torch.empty
    h = alloc(T, KR, device=dev, dtype=f32)
    z = alloc(T, r_u, device=dev, dtype=f32) if r_u else None
    lg = alloc(T, K, device=dev, dtype=f32) if (router_weight is not None and not gates_in_shrink) else None
    # Gated codes G*h in the dot dtype, written by the shrink when it owns the gates.
    hg = torch.empty(T, KR, device=dev, dtype=x.dtype if same else f32) if gates_in_shrink else None

    KR_PAD, K_PAD, RU_PAD = _pad16(KR), _pad16(K), _pad16(r_u)
    A_cat = expert_A.reshape(KR, d_in) if has_e else None
    dummy = x  # never dereferenced: its flag is off
    order_t = order if has_users else dummy
    uid_t = user_ids if has_users else dummy
    interp = _interpret()
    c_t = user_logit_bias if (user_logit_bias is not None and has_e) else None
    v_t = user_router if (user_router is not None and has_e) else None

    def ptr(t):
        return t if t is not None else dummy

    # Shrink: only when something reads x in rank space.
    if has_e or r_u:
        bk = cfg.shrink_block_k
        sbm = cfg.shrink_block_m or cfg.block_m
        k_per_split = triton.cdiv(triton.cdiv(d_in, cfg.split_k if atomic else 1), bk) * bk
        split = triton.cdiv(d_in, k_per_split) if d_in else 1  # 1 unless atomic
        grid = (triton.cdiv(T, sbm), split)
        _mixture_shrink_kernel[grid](
            x, ptr(A_cat), ptr(router_weight), user_A if r_u else dummy, order_t, uid_t, ptr(c_t), ptr(v_t),
            h if has_e else dummy, ptr(lg), z if r_u else dummy, g if has_e else dummy, ptr(hg),
            T, d_in, k_per_split, float(expert_scale),
            *x.stride(), *_strides(A_cat, 2), *_strides(router_weight, 2), *_strides(user_A if r_u else None, 3),
            h.stride(0) if has_e else 0, lg.stride(0) if lg is not None else 0, z.stride(0) if r_u else 0,
            g.stride(0) if has_e else 0, hg.stride(0) if hg is not None else 0,
            *_strides(c_t, 2), *_strides(v_t, 3),
            R=max(r, 1), KR=KR, K=K, RU=r_u, KR_PAD=KR_PAD, K_PAD=K_PAD, RU_PAD=RU_PAD, TOP_K=top_k or 0,
            HAS_EXPERTS=has_e, HAS_ROUTER=router_weight is not None, HAS_USER_A=r_u > 0,
            HAS_USER_BIAS=c_t is not None, HAS_USER_ROUTER=v_t is not None,
            HAS_USERS=has_users, ATOMIC=atomic, GATES=gates_in_shrink, DOT_DTYPE=dot_dtype, PRECISION=precision,
            BLOCK_M=sbm, BLOCK_K=bk,
            **({} if interp else dict(num_warps=cfg.shrink_warps, num_stages=cfg.shrink_stages)),
        )

    # Expand (+ base).
    fused = variant == "fused"
    add_y = variant == "standalone"
    if add_y:
        if same:
            y = torch.nn.functional.linear(x, weight, bias)
        else:
            y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    n_pid = triton.cdiv(T, cfg.block_m) * triton.cdiv(d_out, cfg.block_n)
    if n_pid > 0:
        grid = (n_pid,)
        _mixture_expand_kernel[grid](
            x, weight if fused else dummy, bias if (bias is not None and not add_y) else dummy, y,
            h if has_e else dummy, ptr(lg), z if r_u else dummy, g if has_e else dummy, ptr(hg),
            expert_B if has_e else dummy, user_B if user_B is not None else dummy,
            user_logit_bias if user_logit_bias is not None else dummy,
            user_router if user_router is not None else dummy,
            order_t, uid_t,
            T, d_in, d_out, float(expert_scale), float(user_scale),
            *x.stride(), *_strides(weight if fused else None, 2), *y.stride(),
            h.stride(0) if has_e else 0, lg.stride(0) if lg is not None else 0,
            z.stride(0) if r_u else 0, g.stride(0) if has_e else 0, hg.stride(0) if hg is not None else 0,
            *_strides(expert_B, 3), *_strides(user_B, 3), *_strides(user_logit_bias, 2),
            *_strides(user_router, 3),
            R=max(r, 1), KR=KR, K=K, RU=r_u, KR_PAD=KR_PAD, K_PAD=K_PAD, RU_PAD=RU_PAD,
            TOP_K=top_k or 0,
            HAS_W=fused, HAS_BIAS=bias is not None and not add_y, ADD_Y=add_y,
            HAS_EXPERTS=has_e, HAS_ROUTER=router_weight is not None,
            HAS_USER_BIAS=user_logit_bias is not None and has_e, HAS_USER_B=r_u > 0,
            HAS_USER_ROUTER=user_router is not None and has_e, HAS_USERS=has_users,
            GATED=gates_in_shrink, DOT_DTYPE=dot_dtype, PRECISION=precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            **({} if interp else dict(num_warps=cfg.expand_warps, num_stages=cfg.expand_stages)),
        )
    return y, h, (z if r_u else torch.zeros(T, r_u_out, device=dev, dtype=f32)), g
