"""Auxiliary losses of the group stage (the trainer adds them to the LM loss)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .mixture import compute_dtype

__all__ = ["balance_loss", "diversity_loss", "gate_importance", "balance_from_importance"]


def gate_importance(gates: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-expert gate mass ``importance_k = sum_t g_tk`` [K] over the tokens of
    ``gates`` [..., K] (``mask`` [...] bool keeps a subset, e.g. non-padding tokens),
    summed in fp32 (fp64 stays fp64). Masses of several batches add up: the mass of
    a global batch is the sum of its parts' (data parallelism all-reduces it)."""
    if gates.dim() < 1:
        raise ValueError(f"gates must be [..., K], got shape {list(gates.shape)}")
    g = gates.reshape(-1, gates.shape[-1])
    g = g.to(compute_dtype(g.dtype))  # fp32 sums; fp64 stays fp64 (gradcheck)
    if mask is not None:
        if tuple(mask.shape) != tuple(gates.shape[:-1]):
            raise ValueError(f"mask must have shape {list(gates.shape[:-1])}, got {list(mask.shape)}")
        g = g[mask.reshape(-1).bool()]
    return g.sum(0)


def balance_from_importance(importance: Tensor) -> Tensor:
    """cv^2 of per-expert gate masses [K]: ``var(importance) / mean(importance)^2``
    with the population variance; 0 for K = 1 and for a batch without tokens."""
    if importance.dim() != 1:
        raise ValueError(f"importance must be [K], got shape {list(importance.shape)}")
    mean = importance.mean()
    if importance.shape[0] < 2:
        return importance.sum() * 0.0
    return importance.var(unbiased=False) / (mean * mean + 1e-12)


def balance_loss(gates: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """LoRAMoE-style balance: cv^2 of the per-expert gate mass.

    ``importance_k = sum_t g_tk`` over the tokens (``mask`` [...] bool keeps a subset,
    e.g. non-padding tokens), and the loss is ``var(importance) / mean(importance)^2``
    with the population variance. 0 when every expert gets the same mass (and for
    K = 1); grows as the router collapses onto few experts. It is
    ``balance_from_importance(gate_importance(gates, mask))``; over a batch split
    across ranks, sum the parts' :func:`gate_importance` first.

    Args:
        gates: [..., K] gates (rows sum to 1).
        mask:  optional bool [...] matching gates' leading dims.
    """
    return balance_from_importance(gate_importance(gates, mask))


def _pairwise_overlap(M: Tensor) -> Tensor:
    """M [K, a, b]: mean over k != l of ||M_k M_l^T||_F^2 with each M_k of unit Frobenius norm."""
    K = M.shape[0]
    Mf = M.to(compute_dtype(M.dtype))
    Mn = Mf / Mf.flatten(1).norm(dim=1).clamp_min(1e-12).view(K, 1, 1)
    flat = Mn.reshape(K * Mn.shape[1], -1)
    gram = (flat @ flat.t()).reshape(K, Mn.shape[1], K, Mn.shape[1])
    sq = gram.pow(2).sum(dim=(1, 3))  # [K, K]: ||M_k M_l^T||_F^2
    off = sq.sum() - sq.diagonal().sum()
    return off / (K * (K - 1))


def diversity_loss(expert_A: Tensor, expert_B: Optional[Tensor] = None) -> Tensor:
    """Expert diversity: mean overlap of the experts' subspaces, in [0, 1].

    For A_k [r, d_in] scaled to unit Frobenius norm, the overlap of experts k != l is
    ``||A_k A_l^T||_F^2`` (0 for orthogonal row spaces, 1 for identical rank-1
    experts); the loss is its mean over ordered pairs, averaged with the same term
    on the column spaces of B_k [d_out, r] when expert_B is given. K = 1 gives 0.
    """
    if expert_A.dim() != 3:
        raise ValueError(f"expert_A must be [K, r, d_in], got shape {list(expert_A.shape)}")
    if expert_A.shape[0] < 2:
        return expert_A.sum() * 0.0
    loss = _pairwise_overlap(expert_A)
    if expert_B is not None:
        if expert_B.dim() != 3 or expert_B.shape[0] != expert_A.shape[0]:
            raise ValueError(f"expert_B must be [K, d_out, r] with K={expert_A.shape[0]}, got {list(expert_B.shape)}")
        if expert_B.abs().sum() > 0:  # B starts at zero: no subspace yet
            loss = 0.5 * (loss + _pairwise_overlap(expert_B.transpose(1, 2)))
    return loss
