"""Launch configs of the Triton fused backward (``proper_kernels.triton.mixture_bwd``):
:func:`bwd_configs`, the block sizes of its kernels keyed on the ranks, the
activations' dtype and the compute capability."""
from __future__ import annotations

import torch
import triton

from ..runtime.target import DEFAULT_ARCH

__all__ = ["bwd_configs"]


def _p2(n: int, lo: int = 1) -> int:
    """The power of two at least n (and at least lo)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def bwd_configs(K: int, r: int, r_u: int, dtype: torch.dtype = torch.bfloat16, arch: int = DEFAULT_ARCH) -> dict:
    """Block sizes (first guesses for H100 bf16, untuned; see the module docstring),
    keyed on the ranks, the activations' dtype and the compute capability (``arch``,
    ``major * 10 + minor``; the launcher passes the device's, 90 for CPU / meta).

    The rank kernel holds an fp32 tile [BLOCK_M, K_PAD * R_PAD] (+ [BLOCK_M, RU_PAD]) in
    registers across its d_out loop, so BLOCK_M shrinks as the stacked rank grows.
    Every dot dimension is at least 16 (tensor-core minimum).

    The per-user reductions (``xty_*``) split long user segments into chunks of
    ``SPLIT_T`` tokens (``_seg_xty``): 512 gives one user owning T = 8192 tokens 16
    chunks x 32 output tiles (d = 4096) = 512 programs on 132 SMs, each 8 BLOCK_T steps
    long, while the fp32 partials it writes and reads back (r_u x d x 4 B per chunk,
    twice) stay ~12% of the chunk's own input bytes. Also a first guess, unmeasured.

    The rank kernel runs 8 warps at every rank: at the target (K=8, r=16, BM=64) its
    live tiles (e [64, 128] fp32, e * h, G*e and the dy / B tiles of the pipelined
    d_out loop) take 255 registers and spill 360 B with 4 warps on sm_90; 8 warps
    bring it to ~228 registers, no spill (python/aot_check.py). The kernel streams
    dy once, so the extra warps only add loads in flight.

    Deltas from that 16-bit sm_90 table (python/aot_check.py --dtypes fp32 / --arch 80;
    fp32 dots are IEEE FMA dots whose operands take several times the registers):
    * fp32 (and fp64), sm_90: the rank kernel with 2 stages (3 spill 32 B).
    * sm_80, every dtype: the rank kernel at BM = 32, BN = 32, 2 stages (sm_80's
      ptxas spills 130-740 B at 64 x 64), with 16 warps in fp32.
    * fp32 (and fp64), sm_80: the dx kernel's rank chunk BLOCK_C = 16 (64: 600 B of
      spill) and the per-user reductions in 32-token steps with 8 warps (3 KB).
    * fp64, both: the rank kernel at BM = 32, BN = 32, 8 warps, 2 stages (its e tile
      takes two registers per element; 16 warps spill at 128 registers).
    * sm_12x (RTX 50xx / RTX PRO 6000 Blackwell), 16-bit: the rank kernel at BM = 32
      (the sm_90 tile spills 156 B there; 240 registers, no spill at 32).
    """
    k_pad = _p2(K)
    r_pad = _p2(r)
    if k_pad * r_pad < 16:
        r_pad = 16 // k_pad
    kr = k_pad * r_pad
    rank_bm = 64 if kr <= 128 else (32 if kr <= 256 else 16)
    cfg = dict(
        rank=dict(BLOCK_M=rank_bm, BLOCK_N=64, K_PAD=k_pad, R_PAD=r_pad, RU_PAD=_p2(r_u, 16),
                  num_warps=8, num_stages=3),
        dx=dict(BLOCK_M=64, BLOCK_N=128, BLOCK_C=64, K_PAD=_p2(K, 16), RU_PAD=_p2(r_u, 16),
                num_warps=8, num_stages=2),
        # Per-user reductions: X^T Y with small M (rank) and long N (d) or the reverse.
        # SPLIT_T: token chunk of the split over tokens (a multiple of BLOCK_T; 0: never
        # split), engaged when T > SPLIT_T; see ``_seg_xty``.
        xty_small_m=dict(BLOCK_T=64, BLOCK_N=128, SPLIT_T=512, num_warps=4, num_stages=3),
        xty_large_m=dict(BLOCK_T=64, BLOCK_M=128, SPLIT_T=512, num_warps=4, num_stages=3),
    )
    wide = dtype not in (torch.float16, torch.bfloat16)  # fp32 / fp64: IEEE FMA dots
    if arch >= 90:
        if wide:
            cfg["rank"].update(num_stages=2)
        if arch // 10 == 12:
            cfg["rank"].update(BLOCK_M=min(rank_bm, 32))
    else:
        cfg["rank"].update(BLOCK_M=min(rank_bm, 32), BLOCK_N=32, num_stages=2, num_warps=16 if wide else 8)
        if wide:
            cfg["dx"].update(BLOCK_C=16)
            for c in (cfg["xty_small_m"], cfg["xty_large_m"]):
                c.update(BLOCK_T=32, num_warps=8)
    if dtype == torch.float64:  # two registers per accumulator element
        cfg["rank"].update(BLOCK_M=min(rank_bm, 32), BLOCK_N=32, num_stages=2, num_warps=8)
    for c in (cfg["xty_small_m"], cfg["xty_large_m"]):
        assert c["SPLIT_T"] % c["BLOCK_T"] == 0, c
    return cfg
