"""Fused backward of the PROPER mixture: Triton kernels and the launcher ``mixture_bwd``.

The launcher computes, from the saved rank-space codes (h, z, g) of the forward, the
gradients of ``proper_kernels.reference.rankspace.mixture_bwd_ref`` (the contract;
its docstring has the chain rule). Nothing of shape [T, K, d] is ever built: besides
the gradients themselves, the extra memory is rank-space sized (one fp32 buffer of
codes ``[T, K r + K + r_u]``, the gated codes G*h of dB_g, the 16-bit copies of those
operands for the GEMMs) plus, on the split path, a workspace of < 2 T / SPLIT_T rows
of one user's gradient.

Three kernels and a handful of dense GEMMs:

1. ``_mixture_bwd_rank_kernel``: one program per tile of sorted tokens that lie in one
   user segment (the routing plan's tile table). It reads dy once and shrinks it over
   [B_cat | B_u(t)] (e = s_g B_cat^T dy and s_u B_u^T dy in the same d_out loop), then,
   in registers: dh = G * e, dg_k = sum_j e h, the softmax / top_k backward
   dl = g * (dg - <g, dg>), and dz = s_u B_u^T dy + V_u^T dl. It writes dh, dl, dz
   into the code buffer (rank space, small).
2. ``_mixture_bwd_dx_kernel``: dx = dy W0 + dh A_cat + dl W_r + dz A_u(t), per (tile,
   d_in block). dy W0 is a dense GEMM (cuBLAS via torch, see ``_mm``); the kernel
   reads that result tile, adds the rank-space terms and writes dx once (in place when
   the dtypes agree).
3. ``_seg_xty_kernel``: ScatterMoE-groupXtY-style per-user reductions
   out[u] = scale * X_seg^T Y_seg over the tokens of user u (gathered through the
   plan's ``order``, nothing is copied), one program per (user, M block, N block),
   deterministic (no atomics: each output tile is owned by one program and the token
   loop runs in the plan's stable order). Users without tokens get zeros. Used for
   dA_u, dB_u, dV and dc. When T exceeds the config's ``SPLIT_T``, long segments are
   split over tokens: one program per (chunk of SPLIT_T tokens, output tile) writes an
   fp32 partial, a second launch of the same kernel adds each user's partials in a
   fixed order (still no atomics; a user with one chunk writes its result directly).

Dtypes: every accumulator is fp32 (fp64 for fp64 inputs). Tensor-core dots run in the
activations' dtype when it is 16-bit (the weight/code operand is cast to it, as
``torch.autocast`` would), else in fp32 with ``input_precision="ieee"`` (or fp64).
Two exceptions with 16-bit activations: dA_u = sum dz x^T takes its dtype from the
fp32 code dz (x is cast up: a tf32 dot on the GPU), and dV / dc (code times code) run
in IEEE fp32.

Tuning: the block sizes of ``bwd_configs`` (``bwd_config.py``) are first guesses for H100 at the target
shape (d=4096, K=8, r=16, r_u=16, 64 users, T=8192, bf16); they have NOT been
measured (no GPU where this was written). They are plain constants in one place.
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.adapters import Adapters
from ..runtime.target import device_arch
from ..runtime.tiling import segment_chunks, segment_tiles
from .bwd_config import _p2, bwd_configs

__all__ = ["mixture_bwd"]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tokens_at(ORDER, pos, ok, HAS_ORDER: tl.constexpr):
    """Token ids (int64) at sorted positions ``pos``: ORDER[pos], or pos itself when
    the tokens are already in plan order."""
    if HAS_ORDER:
        return tl.load(ORDER + pos, mask=ok, other=0).to(tl.int64)
    return pos.to(tl.int64)


@triton.jit
def _zeros(M: tl.constexpr, N: tl.constexpr, F64: tl.constexpr):
    """A zeroed accumulator tile: fp64 for fp64 launches, else fp32."""
    return tl.zeros((M, N), dtype=tl.float64 if F64 else tl.float32)


@triton.jit
def _scale(acc, hi, lo, F64: tl.constexpr):
    """acc * scale. A compiled kernel receives Python floats as fp32, so fp64 launches
    pass the scale as two fp32 parts hi + lo (``_scale_parts``) and add both products."""
    if F64:
        return acc * hi + acc * lo
    return acc * hi


@triton.jit
def _tile_rows(TILE_START, SEG, ORDER, pid, bucket, HAS_ORDER: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of segment tile ``pid`` (of ``bucket``, tiles.segment_tiles): which of its
    BLOCK_M positions lie in the segment, and their token ids."""
    pos = tl.load(TILE_START + pid) + tl.arange(0, BLOCK_M)
    row_ok = pos < tl.load(SEG + bucket + 1)
    return row_ok, _tokens_at(ORDER, pos, row_ok, HAS_ORDER)


@triton.jit
def _mixture_bwd_rank_kernel(
    DY, H, G, DGX, BG, BU, V, CODE, TILE_BUCKET, TILE_START, ORDER, SEG,
    d_out, K, R, RU, expert_scale, expert_scale_lo, user_scale, user_scale_lo,
    stride_dyt, stride_dyn,
    stride_ht, stride_hc,
    stride_gt, stride_gk,
    stride_dgt, stride_dgk,
    stride_bgk, stride_bgn, stride_bgj,
    stride_buu, stride_bun, stride_buj,
    stride_vu, stride_vk, stride_vj,
    stride_ct, stride_cc,
    DH_OFF, DL_OFF, DZ_OFF,
    HAS_ORDER: tl.constexpr, HAS_DGX: tl.constexpr, HAS_E: tl.constexpr, HAS_BU: tl.constexpr, HAS_V: tl.constexpr,
    WRITE_DH: tl.constexpr, WRITE_DL: tl.constexpr, WRITE_DZ: tl.constexpr, LOWP: tl.constexpr,
    F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr, R_PAD: tl.constexpr, RU_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    bucket = tl.load(TILE_BUCKET + pid)
    if bucket < 0:  # padding tile of the host-side grid bound
        return
    row_ok, tok = _tile_rows(TILE_START, SEG, ORDER, pid, bucket, HAS_ORDER, BLOCK_M)
    user = bucket - 1  # -1: tokens without a user
    has_user = user >= 0
    user_safe = tl.maximum(user, 0).to(tl.int64)
    ru_live = tl.where(has_user, RU, 0)  # user columns that exist for this tile

    # The expert rank space is laid out as K_PAD groups of R_PAD columns: column
    # c = k * R_PAD + j holds expert k, rank j. Padding keeps the per-expert
    # reduction dg_k = sum_j e h a plain reshape + sum in registers.
    cols = tl.arange(0, K_PAD * R_PAD)
    ck = cols // R_PAD
    cj = cols % R_PAD
    col_ok = (ck < K) & (cj < R)
    kk = tl.arange(0, K_PAD)
    ju = tl.arange(0, RU_PAD)

    e = _zeros(BLOCK_M, K_PAD * R_PAD, F64)
    eu = _zeros(BLOCK_M, RU_PAD, F64)
    for n0 in range(0, d_out, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < d_out
        dy = tl.load(DY + tok[:, None] * stride_dyt + n[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_E:
            bg = tl.load(BG + ck[None, :] * stride_bgk + n[:, None] * stride_bgn + cj[None, :] * stride_bgj,
                         mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            if LOWP:
                e += tl.dot(dy, bg.to(dy.dtype))
            else:
                e += tl.dot(dy, bg.to(dy.dtype), input_precision="ieee")
        if HAS_BU:
            bu = tl.load(BU + user_safe * stride_buu + n[:, None] * stride_bun + ju[None, :] * stride_buj,
                         mask=n_ok[:, None] & (ju[None, :] < ru_live), other=0.0)
            if LOWP:
                eu += tl.dot(dy, bu.to(dy.dtype))
            else:
                eu += tl.dot(dy, bu.to(dy.dtype), input_precision="ieee")

    if HAS_E:
        e = _scale(e, expert_scale, expert_scale_lo, F64)
        hm = tl.load(H + tok[:, None] * stride_ht + (ck * R + cj)[None, :] * stride_hc,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        gk = tl.load(G + tok[:, None] * stride_gt + kk[None, :] * stride_gk,
                     mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
        # G_t = g_t repeated r times, in the padded layout.
        gx = tl.reshape(tl.broadcast_to(gk[:, :, None], (BLOCK_M, K_PAD, R_PAD)), (BLOCK_M, K_PAD * R_PAD))
        dh = gx * e
        dg = tl.sum(tl.reshape(e * hm, (BLOCK_M, K_PAD, R_PAD)), axis=2)
        if HAS_DGX:  # the gates' own gradient (e.g. from the balance loss)
            dg += tl.load(DGX + tok[:, None] * stride_dgt + kk[None, :] * stride_dgk,
                          mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(dg.dtype)
        # softmax backward; top_k needs nothing more: g is 0 off the kept set.
        dl = gk * (dg - tl.sum(gk * dg, axis=1)[:, None])
        if WRITE_DH:
            tl.store(CODE + tok[:, None] * stride_ct + (DH_OFF + ck * R + cj)[None, :] * stride_cc, dh,
                     mask=row_ok[:, None] & col_ok[None, :])
        if WRITE_DL:
            tl.store(CODE + tok[:, None] * stride_ct + (DL_OFF + kk)[None, :] * stride_cc, dl,
                     mask=row_ok[:, None] & (kk[None, :] < K))
    if WRITE_DZ:
        dz = _scale(eu, user_scale, user_scale_lo, F64)
        if HAS_V:
            vu = tl.load(V + user_safe * stride_vu + kk[:, None] * stride_vk + ju[None, :] * stride_vj,
                         mask=(kk[:, None] < K) & (ju[None, :] < ru_live), other=0.0)
            # V_u^T dl_t: K is small, a broadcast-and-sum beats a padded dot.
            dz += tl.sum(dl[:, :, None] * vu.to(dl.dtype)[None, :, :], axis=1)
        dz = tl.where(has_user, dz, 0.0)
        tl.store(CODE + tok[:, None] * stride_ct + (DZ_OFF + ju)[None, :] * stride_cc, dz,
                 mask=row_ok[:, None] & (ju[None, :] < RU))


@triton.jit
def _mixture_bwd_dx_kernel(
    DX, BASE, ACT, CODE, AG, WR, AU, TILE_BUCKET, TILE_START, ORDER, SEG,
    d_in, KR, K, RU,
    stride_dxt, stride_dxd, stride_bt, stride_bd, stride_ct, stride_cc,
    stride_agc, stride_agd, stride_wrk, stride_wrd, stride_auu, stride_auj, stride_aud,
    DH_OFF, DL_OFF, DZ_OFF,
    HAS_ORDER: tl.constexpr, HAS_BASE: tl.constexpr, HAS_DH: tl.constexpr, HAS_DL: tl.constexpr,
    HAS_DZ: tl.constexpr, LOWP: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    K_PAD: tl.constexpr, RU_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    bucket = tl.load(TILE_BUCKET + pid)
    if bucket < 0:
        return
    row_ok, tok = _tile_rows(TILE_START, SEG, ORDER, pid, bucket, HAS_ORDER, BLOCK_M)
    user = bucket - 1
    user_safe = tl.maximum(user, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_in
    out_mask = row_ok[:, None] & n_ok[None, :]
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    if HAS_BASE:
        acc += tl.load(BASE + tok[:, None] * stride_bt + n[None, :] * stride_bd, mask=out_mask, other=0.0).to(acc.dtype)
    if HAS_DH:
        # dh A_cat, over the K r rank columns in chunks of BLOCK_C.
        for c0 in range(0, KR, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < KR
            a = tl.load(CODE + tok[:, None] * stride_ct + (DH_OFF + c)[None, :] * stride_cc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(AG + c[:, None] * stride_agc + n[None, :] * stride_agd,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if LOWP:
                acc += tl.dot(a.to(ACT.dtype.element_ty), w.to(ACT.dtype.element_ty))
            else:
                acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
    if HAS_DL:
        kk = tl.arange(0, K_PAD)
        a = tl.load(CODE + tok[:, None] * stride_ct + (DL_OFF + kk)[None, :] * stride_cc,
                    mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(WR + kk[:, None] * stride_wrk + n[None, :] * stride_wrd,
                    mask=(kk[:, None] < K) & n_ok[None, :], other=0.0)
        if LOWP:
            acc += tl.dot(a.to(ACT.dtype.element_ty), w.to(ACT.dtype.element_ty))
        else:
            acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
    if HAS_DZ:
        if user >= 0:
            ju = tl.arange(0, RU_PAD)
            a = tl.load(CODE + tok[:, None] * stride_ct + (DZ_OFF + ju)[None, :] * stride_cc,
                        mask=row_ok[:, None] & (ju[None, :] < RU), other=0.0)
            w = tl.load(AU + user_safe * stride_auu + ju[:, None] * stride_auj + n[None, :] * stride_aud,
                        mask=(ju[:, None] < RU) & n_ok[None, :], other=0.0)
            if LOWP:
                acc += tl.dot(a.to(ACT.dtype.element_ty), w.to(ACT.dtype.element_ty))
            else:
                acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
    tl.store(DX + tok[:, None] * stride_dxt + n[None, :] * stride_dxd, acc.to(DX.dtype.element_ty), mask=out_mask)


@triton.jit
def _seg_xty_kernel(
    X, Y, OUT, ORDER, SEG, WS, CHUNKS, WS_OFF, M, N, scale, scale_lo, chunk_t,
    stride_xt, stride_xm, stride_yt, stride_yn, stride_ou, stride_om, stride_on,
    stride_wr, stride_wm, stride_wn, stride_ch,
    HAS_ORDER: tl.constexpr, Y_ONES: tl.constexpr, LOWP: tl.constexpr, F64: tl.constexpr, MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[u] = scale * sum_{t in segment of user u} X[t]^T Y[t]; user u is bucket u + 1.
    # MODE 0: one program per (user, M block, N block) loops over the whole segment.
    # MODE 1: one program per (chunk, M block, N block) of the chunk table CHUNKS
    #   (tiles.segment_chunks over the users' buckets): a user's only chunk writes
    #   out[u] itself, the others write unscaled partials into workspace rows.
    # MODE 2: one program per (user, M block, N block) adds its user's workspace rows
    #   [WS_OFF[u], WS_OFF[u + 1]) in order into out[u] (zeros for users without tokens;
    #   users whose only chunk already wrote out[u] return at once).
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    out_mask = m_ok[:, None] & n_ok[None, :]
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    if MODE == 2:
        user = pid.to(tl.int64)
        r0 = tl.load(WS_OFF + user)
        r1 = tl.load(WS_OFF + user + 1)
        seg_len = tl.load(SEG + user + 2) - tl.load(SEG + user + 1)
        if (r1 == r0) & (seg_len > 0):  # solo: written by its chunk
            return
        ws_ptr = WS + r0.to(tl.int64) * stride_wr + m[:, None] * stride_wm + n[None, :] * stride_wn
        for _ in range(r0, r1):
            acc += tl.load(ws_ptr, mask=out_mask, other=0.0)
            ws_ptr += stride_wr
        acc = _scale(acc, scale, scale_lo, F64)
        tl.store(OUT + user * stride_ou + m[:, None] * stride_om + n[None, :] * stride_on,
                 acc.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        if MODE == 1:
            user = tl.load(CHUNKS + pid)
            if user < 0:  # padding chunk of the host-side bound
                return
            user = user.to(tl.int64)
            seg_start = tl.load(CHUNKS + stride_ch + pid)
            seg_end = tl.minimum(seg_start + chunk_t, tl.load(SEG + user + 2))
            row = tl.load(CHUNKS + 2 * stride_ch + pid)
        else:
            user = pid.to(tl.int64)
            seg_start = tl.load(SEG + user + 1)
            seg_end = tl.load(SEG + user + 2)
        for t0 in range(seg_start, seg_end, BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            t_ok = pos < seg_end
            tok = _tokens_at(ORDER, pos, t_ok, HAS_ORDER)
            xt = tl.load(X + tok[None, :] * stride_xt + m[:, None] * stride_xm,
                         mask=m_ok[:, None] & t_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_T]
            if Y_ONES:
                acc += tl.sum(xt.to(acc.dtype), axis=1)[:, None]
            else:
                yt = tl.load(Y + tok[:, None] * stride_yt + n[None, :] * stride_yn,
                             mask=t_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_N]
                if LOWP:
                    acc += tl.dot(xt.to(X.dtype.element_ty), yt.to(X.dtype.element_ty))
                else:
                    acc += tl.dot(xt.to(acc.dtype), yt.to(acc.dtype), input_precision="ieee")
        if MODE == 1:
            if row >= 0:  # one of several chunks: an unscaled partial
                tl.store(WS + row.to(tl.int64) * stride_wr + m[:, None] * stride_wm + n[None, :] * stride_wn,
                         acc.to(WS.dtype.element_ty), mask=out_mask)
            else:  # the user's only chunk
                acc = _scale(acc, scale, scale_lo, F64)
                tl.store(OUT + user * stride_ou + m[:, None] * stride_om + n[None, :] * stride_on,
                         acc.to(OUT.dtype.element_ty), mask=out_mask)
        else:
            acc = _scale(acc, scale, scale_lo, F64)
            tl.store(OUT + user * stride_ou + m[:, None] * stride_om + n[None, :] * stride_on,
                     acc.to(OUT.dtype.element_ty), mask=out_mask)


# The dense reductions over all tokens (dW0 = dy^T x, dA_g = dh^T x, dW_r = dl^T x,
# dB_g = s_g dy^T (G*h)) and the dense dx = dy W0 are plain GEMMs with a long
# reduction over T (or a full d_out x d_in GEMM): cuBLAS through torch is the right
# tool, and a one-segment groupXtY would need a split over T to fill the GPU. The
# rank-space operand is cast to the activations' dtype (a [T, K r + K] copy, small);
# x and dy are never copied (same dtype). ``_mm`` is the one place that runs them.


def _gemm_dtype(act: torch.dtype) -> torch.dtype:
    return act if act in (torch.float16, torch.bfloat16) else (torch.float64 if act == torch.float64 else torch.float32)


def _mm(a: Tensor, b: Tensor, dt: torch.dtype, out: torch.dtype) -> Tensor:
    """a @ b in dtype ``dt`` (fp32 accumulation inside cuBLAS), result in ``out``."""
    return torch.mm(a.to(dt), b.to(dt)).to(out)


def _scale_parts(s: float, f64: bool) -> Tuple[float, float]:
    """(hi, lo) for ``_scale``: with f64, two fp32-exact floats whose sum is s to ~2^-48
    relative (a compiled kernel rounds a float argument to fp32); else (s, 0.0)."""
    s = float(s)
    if not f64:
        return s, 0.0
    try:
        hi = struct.unpack("f", struct.pack("f", s))[0]
        return hi, struct.unpack("f", struct.pack("f", s - hi))[0]
    except OverflowError:  # beyond fp32's range: nothing to split
        return s, 0.0


def _seg_xty(X: Tensor, Y: Optional[Tensor], out: Tensor, order: Tensor, seg: Tensor, scale: float,
             lowp: bool, cfg: dict, chunk_tables: Optional[dict] = None) -> Tensor:
    """out[u] = scale * X_seg(u)^T Y_seg(u) for every user u (out [N, M, Nn]); Y None: ones.

    One pass (``MODE`` 0, grid users x output tiles) when no segment can be longer
    than the config's ``SPLIT_T`` (T <= SPLIT_T, known on the host). Otherwise the
    users' segments are cut into chunks of SPLIT_T tokens on the device
    (``tiles.segment_chunks``, no host sync; ``chunk_tables`` caches the table per
    chunk size across the calls of one backward): ``MODE`` 1 runs one program per
    (chunk, output tile); a user's only chunk writes out[u] directly (short segments
    pay nothing but one early-exit program per user and tile in the second pass), the
    chunks of longer segments write unscaled fp32 (fp64) partials into a workspace of
    W = T // SPLIT_T + T // (SPLIT_T + 1) < 2 T / SPLIT_T rows of [M, Nn]; ``MODE`` 2
    adds each user's partials in chunk order into out[u] and writes zeros for users
    without tokens. Deterministic: fixed chunking, fixed summation order, no atomics.
    """
    N_users, M, Nn = out.shape
    if N_users == 0:
        return out
    if M <= Nn:  # rank x d (dA_u, dV, dc): the small side is one tile
        c = cfg["xty_small_m"]
        bm, bn = min(_p2(M, 16), 64), min(_p2(Nn, 16), c["BLOCK_N"])
    else:  # d x rank (dB_u)
        c = cfg["xty_large_m"]
        bm, bn = min(_p2(M, 16), c["BLOCK_M"]), min(_p2(Nn, 16), 64)
    bt, w, st, split = c["BLOCK_T"], c["num_warps"], c["num_stages"], c.get("SPLIT_T", 0)
    if bm * bn <= 256:  # a 16 x 16 tile (dV, dc): 2 warps (4 spill 4 B with triton 3.6 on sm_90)
        w = min(w, 2)
    T = X.shape[0]
    tiles_m, tiles_n = triton.cdiv(M, bm), triton.cdiv(Nn, bn)
    y_ones = Y is None
    Yt = X if y_ones else Y
    sc = _scale_parts(scale, out.dtype == torch.float64)
    common = (X.stride(0), X.stride(1), Yt.stride(0), Yt.stride(1), out.stride(0), out.stride(1), out.stride(2))
    meta = dict(HAS_ORDER=True, Y_ONES=y_ones, LOWP=lowp, F64=out.dtype == torch.float64, BLOCK_T=bt,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    if not split or T <= split:
        _seg_xty_kernel[(N_users, tiles_m, tiles_n)](
            X, Yt, out, order, seg, out, seg, seg, M, Nn, *sc, 0, *common, 0, 0, 0, 0, MODE=0, **meta)
        return out
    if split % bt:
        raise ValueError(f"SPLIT_T={split} is not a multiple of BLOCK_T={bt}")
    if chunk_tables is None:
        chunk_tables = {}
    if split not in chunk_tables:
        # Over the users' buckets only (bucket 0, tokens without a user, is never reduced).
        chunk_tables[split] = segment_chunks(seg[1:], T, split)
    table, ws_off, C, W = chunk_tables[split]
    ws = torch.empty(W, M, Nn, device=out.device, dtype=out.dtype)
    ws_strides = (ws.stride(0), ws.stride(1), ws.stride(2), table.stride(0))
    if C > 0:
        _seg_xty_kernel[(C, tiles_m, tiles_n)](
            X, Yt, out, order, seg, ws, table, ws_off, M, Nn, *sc, split, *common, *ws_strides,
            MODE=1, **meta)
    _seg_xty_kernel[(N_users, tiles_m, tiles_n)](
        X, Yt, out, order, seg, ws, table, ws_off, M, Nn, *sc, split, *common, *ws_strides,
        MODE=2, **meta)
    return out


# ----------------------------------------------------------------------------- launcher


def mixture_bwd(
    dy: Tensor, x: Tensor, h: Tensor, z: Tensor, g: Tensor, weight: Optional[Tensor], adapters: Adapters,
    order: Optional[Tensor], seg_offsets: Optional[Tensor], needs: Tuple[bool, ...],
    *, dx_dtype: Optional[torch.dtype] = None, dg_ext: Optional[Tensor] = None,
):
    """All gradients of the mixture from the saved codes (contract: ``mixture_bwd_ref``).

    Args:
        dy [T, d_out], x [T, d_in] (same dtype: fp16, bf16, fp32 or fp64);
        h [T, K r], z [T, r_u], g [T, K]: the forward's codes, in the compute dtype
        (fp32; fp64 for fp64 x); weight W0 [d_out, d_in]; adapters: the layer's
        :class:`~proper_kernels.reference.adapters.Adapters` (user_logit_bias and
        top_k are not read: the gates carry them); order [T] int32, seg_offsets
        [N + 2] int32 (the RoutingPlan; None when no user-indexed tensor exists);
        needs: 10 bools.
        dx_dtype: dtype of dx (default: the compute dtype, as the contract says).
        dg_ext [T, K]: gradient reaching the gates directly; joins dg before the
        softmax backward (None: the gates were not used).

    Returns (dx, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV), each in the compute
    dtype (dx in ``dx_dtype``), None where not needed or not applicable. Mutates
    nothing. Deterministic: no atomics.
    """
    (n_x, n_w, n_b, n_Ag, n_Bg, n_Wr, n_c, n_Au, n_Bu, n_V) = (bool(f) for f in needs)
    expert_A, expert_B, router_weight, _, user_A, user_B, user_router, expert_scale, user_scale, _ = adapters
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    gd = _gemm_dtype(x.dtype)
    lowp = x.dtype in (torch.float16, torch.bfloat16)
    dx_dtype = dx_dtype or cd
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    T, d_in = x.shape
    d_out = dy.shape[1]
    dev = x.device
    has_e = expert_A is not None
    has_wr = has_e and router_weight is not None
    has_u = user_A is not None
    has_bu = user_B is not None
    has_v = has_e and user_router is not None
    K, r = (expert_A.shape[0], expert_A.shape[1]) if has_e else (0, 0)
    r_u = user_A.shape[1] if has_u else (user_router.shape[2] if user_router is not None else 0)
    N = seg_offsets.numel() - 2 if seg_offsets is not None else None

    dx = dW0 = db = dA_g = dB_g = dW_r = dc = dA_u = dB_u = dV = None
    if n_w and weight is not None:
        dW0 = _mm(dy.t(), x, gd, cd)
    if n_b:
        db = dy.sum(0, dtype=cd)
    if has_e and n_Bg:
        hg = (h * g.repeat_interleave(r, dim=-1)) if r > 0 else h
        dB_g = (expert_scale * _mm(dy.t(), hg, gd, cd)).reshape(d_out, K, r).permute(1, 0, 2).contiguous()

    # Which rank-space codes are needed (frozen parts cost nothing).
    need_dl = has_e and (n_x and has_wr or n_Wr and has_wr or n_c and N is not None or n_V and has_v
                         or (n_x or n_Au) and has_u and has_v)
    need_dh = has_e and (n_x or n_Ag)
    need_dz = has_u and (n_x or n_Au)
    if need_dl or need_dh or need_dz:
        if N is None and has_u:
            raise ValueError("user tensors need order/seg_offsets (a RoutingPlan)")
    cfg = bwd_configs(max(K, 1), max(r, 1), max(r_u, 1), x.dtype, device_arch(dev))

    if seg_offsets is None:
        seg = torch.tensor([0, T], dtype=torch.int32, device=dev)
        order_t, has_order = seg, False  # dummy pointer: HAS_ORDER is off
    else:
        seg, order_t, has_order = seg_offsets, order, True

    KR = K * r
    dh_off, dl_off, dz_off = 0, KR, KR + K
    code = None
    if need_dl or need_dh or need_dz:
        code = torch.empty(T, KR + K + r_u, device=dev, dtype=cd)
        c = cfg["rank"]
        tb, ts, G = segment_tiles(seg, T, c["BLOCK_M"])
        if G > 0:
            eA = expert_B if has_e else code
            _mixture_bwd_rank_kernel[(G,)](
                dy, h if has_e else code, g if has_e else code,
                dg_ext if dg_ext is not None else code, eA,
                user_B if has_bu else code, user_router if has_v else code, code,
                tb, ts, order_t, seg,
                d_out, K, r, r_u, *_scale_parts(expert_scale, cd == torch.float64),
                *_scale_parts(user_scale, cd == torch.float64),
                dy.stride(0), dy.stride(1),
                h.stride(0) if has_e else 0, h.stride(1) if has_e else 0,
                g.stride(0) if has_e else 0, g.stride(1) if has_e else 0,
                *(dg_ext.stride() if dg_ext is not None else (0, 0)),
                *(expert_B.stride() if has_e else (0, 0, 0)),
                *(user_B.stride() if has_bu else (0, 0, 0)),
                *(user_router.stride() if has_v else (0, 0, 0)),
                code.stride(0), code.stride(1),
                dh_off, dl_off, dz_off,
                HAS_ORDER=has_order, HAS_DGX=dg_ext is not None and has_e, HAS_E=has_e and (need_dl or need_dh), HAS_BU=has_bu and need_dz,
                HAS_V=has_v and need_dz, WRITE_DH=need_dh, WRITE_DL=need_dl, WRITE_DZ=need_dz, LOWP=lowp,
                F64=cd == torch.float64,
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], K_PAD=c["K_PAD"], R_PAD=c["R_PAD"],
                RU_PAD=c["RU_PAD"], num_warps=c["num_warps"], num_stages=c["num_stages"],
            )

    # Dense reductions over all tokens: dA_g and dW_r in one GEMM when both are needed.
    want_ag, want_wr = has_e and n_Ag, has_wr and n_Wr
    if want_ag or want_wr:
        lo, hi = (dh_off if want_ag else dl_off), (dl_off + K if want_wr else dl_off)
        both = _mm(code[:, lo:hi].t(), x, gd, cd)
        if want_ag:
            dA_g = both[:KR].reshape(K, r, d_in)
        if want_wr:
            # A copy (K x d_in, small) when dA_g shares ``both``: results may not alias.
            dW_r = both[KR:].clone() if want_ag else both

    if n_x:
        base = _mm(dy, weight, gd, gd if dx_dtype == gd else cd) if weight is not None else None
        use_dh, use_dl, use_dz = has_e, has_wr, has_u
        if not (use_dh or use_dl or use_dz):
            dx = base.to(dx_dtype) if base is not None else x.new_zeros(x.shape, dtype=dx_dtype)
        else:
            c = cfg["dx"]
            dx = base if (base is not None and base.dtype == dx_dtype) else torch.empty(T, d_in, device=dev, dtype=dx_dtype)
            tb, ts, G = segment_tiles(seg, T, c["BLOCK_M"])
            A_cat = expert_A.reshape(KR, d_in) if has_e else code
            grid = (G, triton.cdiv(d_in, c["BLOCK_N"]))
            if G > 0:
                _mixture_bwd_dx_kernel[grid](
                    dx, base if base is not None else x, x, code, A_cat,
                    router_weight if use_dl else code, user_A if use_dz else code,
                    tb, ts, order_t, seg,
                    d_in, KR, K, r_u,
                    dx.stride(0), dx.stride(1),
                    *((base.stride(0), base.stride(1)) if base is not None else (0, 0)),
                    code.stride(0), code.stride(1),
                    *((A_cat.stride(0), A_cat.stride(1)) if has_e else (0, 0)),
                    *(router_weight.stride() if use_dl else (0, 0)),
                    *(user_A.stride() if use_dz else (0, 0, 0)),
                    dh_off, dl_off, dz_off,
                    HAS_ORDER=has_order, HAS_BASE=base is not None, HAS_DH=use_dh, HAS_DL=use_dl,
                    HAS_DZ=use_dz, LOWP=lowp, F64=cd == torch.float64,
                    BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_C=c["BLOCK_C"],
                    K_PAD=c["K_PAD"], RU_PAD=c["RU_PAD"], num_warps=c["num_warps"], num_stages=c["num_stages"],
                )

    # Per-user segment reductions (groupXtY); users without tokens get zeros. Long
    # segments are split over tokens (``_seg_xty``); the chunk table is built once.
    if N is not None:
        chunks: dict = {}
        if has_u and n_Au:
            dA_u = _seg_xty(code[:, dz_off:dz_off + r_u], x, torch.empty(user_A.shape, device=dev, dtype=cd),
                            order_t, seg, 1.0, lowp, cfg, chunks)
        if has_u and has_bu and n_Bu:
            dB_u = _seg_xty(dy, z, torch.empty(user_B.shape, device=dev, dtype=cd), order_t, seg,
                            user_scale, lowp, cfg, chunks)
        if has_v and n_V:
            dV = _seg_xty(code[:, dl_off:dl_off + K], z, torch.empty(user_router.shape, device=dev, dtype=cd),
                          order_t, seg, 1.0, False, cfg, chunks)
        if has_e and n_c and K > 0:
            dc = _seg_xty(code[:, dl_off:dl_off + K], None, torch.empty(N, K, 1, device=dev, dtype=cd),
                          order_t, seg, 1.0, False, cfg, chunks).reshape(N, K)
    return (dx if n_x else None, dW0, db, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV)
