"""Launch configs and the variant choice of the Triton fused forward
(``proper_kernels.triton.mixture_fwd``): :func:`fwd_config`, the config table keyed on
a T bucket, the dims, the rank, the dot dtype and the compute capability, and
:func:`forward_variant`, how the base GEMM meets the mixture."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from ..runtime.target import DEFAULT_ARCH

__all__ = ["DECODE_MAX_T", "FwdConfig", "fwd_config", "forward_variant"]

# Up to this many tokens the forward runs in the decode regime (split-K shrink,
# narrow d_out tiles): the grid must still fill 132 SMs from a handful of tokens.
DECODE_MAX_T = 256
_NUM_SMS_H100 = 132
_NUM_SMS_A100 = 108


def _interpret() -> bool:
    """Whether the kernels run in the CPU interpreter (its configs: the smallest tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class FwdConfig(NamedTuple):
    regime: str  # "decode" or "prefill"
    block_m: int  # token tile (both kernels)
    shrink_block_k: int  # d_in step of the shrink
    split_k: int  # d_in slices of the shrink (decode); 1 = no atomics
    shrink_warps: int
    shrink_stages: int
    block_n: int  # d_out tile of the expand / fused GEMM
    block_k: int  # d_in step of the fused base GEMM
    group_m: int  # grouped program order of the expand (L2 reuse of W0 / B tiles)
    expand_warps: int
    expand_stages: int
    shrink_block_m: int = 0  # token tile of the shrink; 0 = block_m


def fwd_config(T: int, d_in: int, d_out: int, rank: int, variant: str,
               dtype: torch.dtype = torch.bfloat16, arch: int = DEFAULT_ARCH) -> FwdConfig:
    """The launch-config table, keyed on (T bucket, d_in, d_out, effective rank K r + r_u,
    dot dtype, compute capability).

    ``dtype`` is the dtype the kernels' dots run in (x's dtype when every parameter
    shares it, else fp32); ``arch`` is ``major * 10 + minor`` (see
    :mod:`proper_kernels.runtime.target`: the launcher passes the device's, 90 for
    CPU / meta tensors). The 16-bit sm_90 table below is the reference; fp32 and
    sm_80 take the deltas of :func:`_fp32_config` / :func:`_sm80_16bit_config`.

    Never keyed on exact T or on the plan: one compiled kernel per (dims, bucket).
    Under TRITON_INTERPRET=1 one small config per regime (the interpreter is slow and
    small blocks exercise the masks, the split-K and multi-tile paths).

    H100 choices (not measured here; tune with python/ sweeps):
    * decode (T <= 256): BM = next pow2 of T in [16, 64]; the shrink splits d_in so
      that m_tiles * SPLIT_K ~ 1-2 waves of 132 SMs (each slice >= one BK=32/64 step);
      the expand uses BN = 32/64 so cdiv(d_out, BN) * m_tiles >= 132, with 8 warps
      once BM = 64 (see the register note below).
    * prefill: shrink BM=64, BK=64, 8 warps when K r >= 128 (h acc is 64 x K r fp32);
      fused GEMM 128 x 128 x 64, 8 warps, 3 stages, GROUP_M=8 (the base GEMM
      dominates: ~275 GFLOP vs 19 for the mixture at d=4096, T=8192);
      standalone expand 64 x 128 (only the rank-space K-dim, ~144 deep).

    Registers (ptxas, sm_90, bf16, K=8 r=16 r_u=16; check with python/aot_check.py
    --fail-on-spill, enforced by tests/test_aot.py):
    * decode expand at BM = 64 finishes the gates in its epilogue (split-K shrink):
      the h tile [64, K r] fp32, the one-hot gate repeat and the V_u loop sit next to
      the [64, BN] accumulator. With 4 warps that is 255 registers and spills
      (16-56 B, BN = 64; 4 B standalone at BN = 32); 8 warps spread the same tiles
      over twice the threads (130-188 registers, no spill). Decode is bandwidth
      bound, so the extra warps cost nothing and add loads in flight; the tile shape
      (and so the grid that fills 132 SMs) is unchanged. BM = 16 keeps 4 warps
      (~100 registers).
    * prefill fused GEMM keeps 128 x 128 x 64, 8 warps, 3 stages (168 registers, no
      spill since the shrink finishes the gates and writes s_g G*h): the base GEMM
      is ~93% of the FLOPs, and a 64-wide BN or 4 warps would cost tensor-core tile
      efficiency against cuBLAS for no register gain. If the epilogue grows again,
      prefer moving work to the shrink over shrinking this tile.
    """
    decode = T <= DECODE_MAX_T
    regime = "decode" if decode else "prefill"
    if _interpret():
        bm = 16
        bk = 16
        split = max(1, min(triton.cdiv(d_in, bk), 4)) if decode else 1
        return FwdConfig(regime, bm, bk, split, 4, 1, 16 if decode else 32, 16, 2, 4, 1)
    if dtype not in (torch.float16, torch.bfloat16):
        return _fp32_config(T, d_in, d_out, rank, variant, arch)
    if arch < 90:
        return _sm80_16bit_config(T, d_in, d_out, rank, variant)
    if decode:
        bm = min(64, max(16, triton.next_power_of_2(T)))
        m_tiles = triton.cdiv(T, bm)
        # BK=64 slices when d_in has enough of them, else BK=32 (d=4096, T=64: 128
        # slices of 32 -> 128 CTAs, each reading a 32-wide column block of every
        # adapter once).
        bk = 64 if triton.cdiv(d_in, 64) * m_tiles >= _NUM_SMS_H100 else 32
        split = _decode_split(T, bm, d_in, bk, _NUM_SMS_H100)
        bn = 64 if m_tiles * triton.cdiv(d_out, 64) >= _NUM_SMS_H100 else 32
        bk_base = 128 if variant == "fused" else 64
        ew = 8 if bm >= 64 else 4  # 4 warps at BM = 64 spill (gates in the epilogue)
        return FwdConfig(regime, bm, bk, split, 4, 3, bn, bk_base, 1, ew, 4)
    shrink_warps = 8 if rank >= 128 else 4
    if variant == "fused":
        # The shrink keeps a 64-row tile (its h accumulator is BM x K r fp32).
        return FwdConfig(regime, 128, 64, 1, shrink_warps, 3, 128, 64, 8, 8, 3, 64)
    return FwdConfig(regime, 64, 64, 1, shrink_warps, 3, 128, 64, 8, 4, 3)


def _num_sms(arch: int) -> int:
    """SMs the decode grids aim to fill: H100 SXM for sm_90+, A100 below."""
    return _NUM_SMS_H100 if arch >= 90 else _NUM_SMS_A100


def _decode_split(T: int, shrink_bm: int, d_in: int, bk: int, num_sms: int) -> int:
    """SPLIT_K of the decode shrink: m_tiles * SPLIT_K ~ 2 waves, each slice >= one BK step."""
    want = max(1, (2 * num_sms) // triton.cdiv(T, shrink_bm))
    return max(1, min(triton.cdiv(d_in, bk), want))


def _fp32_config(T: int, d_in: int, d_out: int, rank: int, variant: str, arch: int) -> FwdConfig:
    """fp32 dots (fp32 inputs, or mixed dtypes), sm_80 and sm_90.

    An IEEE fp32 tl.dot runs on the FMA units, and its operands sit in registers in
    a layout that repeats them across the threads of the output tile: per thread it
    takes several times the registers of a bf16 tensor-core tile of the same shape
    (the 16-bit table spills 0.1-40 KB per thread in fp32; python/aot_check.py
    --dtypes fp32). So: token tiles of at most 32 rows in the shrink (its h
    accumulator is BM x K r fp32) and at decode, 8 warps everywhere, K steps of
    16-32, 16-32 wide d_out tiles at decode (BN = 16 at BM = 16: 4 warps or BN = 32
    spill there), and the prefill expand at 64 x 64 (sm_90; 16 warps without the
    base GEMM) or 32 x 32 (sm_80, whose ptxas spills at 64 x 64 with 8 or 16 warps). fp32 is not where the
    throughput is (bf16 and cuBLAS are), so these stay simple and spill-free.
    """
    num_sms = _num_sms(arch)
    if T <= DECODE_MAX_T:
        bm = min(32, max(16, triton.next_power_of_2(T)))
        bk = 16 if bm == 16 else 32
        bn = 16 if bm == 16 else 32
        split = _decode_split(T, bm, d_in, bk, num_sms)
        return FwdConfig("decode", bm, bk, split, 8, 3, bn, 64, 1, 8, 3)
    tile = 64 if arch >= 90 else 32
    # sm_90's ptxas spills the standalone 64 x 64 expand with 8 warps (9 KB), not with 16.
    ew = 16 if (arch >= 90 and variant != "fused") else 8
    return FwdConfig("prefill", tile, 32, 1, 8, 3, tile, 32, 8, ew, 3, 32)


def _sm80_16bit_config(T: int, d_in: int, d_out: int, rank: int, variant: str) -> FwdConfig:
    """fp16 / bf16 on sm_80 (A100: 108 SMs, 163 KB shared memory per block).

    The sm_90 table with one change: the shrink runs 8 warps on token tiles of at
    most 32 rows (sm_80's ptxas spills the 4-warp decode shrinks at BM = 16 and 64:
    8-72 B; sm_86 / sm_89's the prefill one at BM = 64: 24 B). The expand tiles are
    sm_90's (no spill; at most 96 KB of shared memory on sm_8x, within sm_86 /
    sm_89's 99 KB too).
    """
    decode = T <= DECODE_MAX_T
    if not decode:
        if variant == "fused":
            return FwdConfig("prefill", 128, 64, 1, 8, 3, 128, 64, 8, 8, 3, 32)
        return FwdConfig("prefill", 64, 64, 1, 8, 3, 128, 64, 8, 4, 3, 32)
    num_sms = _NUM_SMS_A100
    bm = min(64, max(16, triton.next_power_of_2(T)))
    sbm = min(bm, 32)
    m_tiles = triton.cdiv(T, bm)
    bk = 64 if triton.cdiv(d_in, 64) * triton.cdiv(T, sbm) >= num_sms else 32
    split = _decode_split(T, sbm, d_in, bk, num_sms)
    bn = 64 if m_tiles * triton.cdiv(d_out, 64) >= num_sms else 32
    bk_base = 128 if variant == "fused" else 64
    ew = 8 if bm >= 64 else 4
    return FwdConfig("decode", bm, bk, split, 8, 3, bn, bk_base, 1, ew, 4, sbm)


def forward_variant(T: int, d_in: int, d_out: int, *, has_weight: bool = True,
                    dtype: torch.dtype = torch.bfloat16, same_dtypes: bool = True,
                    rank: int = 144) -> str:
    """THE place that picks how the base linear joins the mixture. Returns one of

    * ``"mixture"``:    no W0: y = b + mixture in the expand kernel.
    * ``"fused"``:      y = x W0^T + b + mixture in one kernel (the base GEMM's d_in
                        loop, then the rank-space expand appended to its accumulator).
    * ``"standalone"``: y = torch GEMM (cuBLAS) first, the expand kernel adds into y.

    Rule: fused for 16-bit inputs whose parameters share x's dtype and whose
    effective rank (K r + r_u) fits the fused epilogue (<= 256): at prefill this is
    the LoRAFusion design point (x and y move once; the mixture is ~7% on top of the
    base GEMM's FLOPs at d=4096, T=8192), at decode it saves a launch and a y round
    trip. Standalone for fp32 (cuBLAS beats an IEEE-fp32 tl.dot GEMM), for mixed
    dtypes, and for large ranks (register pressure in the fused epilogue).
    """
    del T, d_in, d_out  # kept in the signature: the rule may grow T/d buckets once measured
    if not has_weight:
        return "mixture"
    if dtype in (torch.float16, torch.bfloat16) and same_dtypes and rank <= 256:
        return "fused"
    return "standalone"
