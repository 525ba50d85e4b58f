"""The pure-PyTorch oracle of one PROPER-adapted linear (DESIGN.md section 1).

Two forms of the same math, tested against each other:

* :func:`lora_mixture_ref_loop` walks over the users of the batch, one segment at a
  time, and writes every term exactly as the formula reads. It is the spec in code.
* :func:`lora_mixture_ref` is vectorised (gathers and batched matmuls). It is the
  CPU fallback of :func:`proper_kernels.lora_mixture` and what kernels are checked
  against.

Both take already-validated 2-D inputs (x [T, d_in], the :class:`Adapters`, user_ids
[T]), compute in float32 (float64 stays float64) whatever the input dtype, and return
y in x's dtype plus the gates in the compute dtype. Both are differentiable through
autograd. This formula is the contract of every backend; other modules point here
instead of restating it.

Formula, per token t of user u = u(t) (u = -1: every user term is zero)::

    z_t = A_u x_t                                   # [r_u]
    l_t = W_r x_t + c_u + V_u z_t                   # [K]
    g_t = softmax(l_t)      (top_k: softmax over the top_k logits, 0 elsewhere)
    y_t = W0 x_t + b + s_g * sum_k g_tk B_k (A_k x_t) + s_u B_u z_t
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .adapters import Adapters

__all__ = ["lora_mixture_ref", "lora_mixture_ref_loop", "gates_from_logits", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every low-precision dtype; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def gates_from_logits(logits: Tensor, top_k: Optional[int]) -> Tensor:
    """softmax over the last dim; with top_k, over the top_k largest logits only.

    Ties at the k-th value keep the lower expert index (a stable descending sort, the
    rule every kernel follows); the kept set always has exactly top_k members.
    """
    K = logits.shape[-1]
    if top_k is None or top_k >= K:
        return torch.softmax(logits, dim=-1)
    idx = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    masked = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(masked, dim=-1)


def _prepare(x: Tensor, weight, bias, adapters: Adapters, user_ids: Optional[Tensor], d_out: Optional[int]):
    """(compute dtype, x in it, T, d_out), after checking that user-indexed tensors
    come with ids."""
    if not isinstance(adapters, Adapters):
        raise TypeError(f"adapters must be a proper_kernels.Adapters, got {type(adapters).__name__}")
    if user_ids is None and adapters.has_user_terms:
        raise ValueError("user-indexed tensors (user_logit_bias/user_A/user_B/user_router) were given: "
                         "pass user_ids [T] (int, -1 = no user)")
    cd = compute_dtype(x.dtype)
    if d_out is None:
        d_out = _infer_d_out(weight, bias, adapters.expert_B, adapters.user_B)
    return cd, x.to(cd), x.shape[0], d_out


# Above this many elements of a per-token copy of the user weights ([T, m, k]), the
# per-user products run one user segment at a time instead of as one gathered bmm
# (T = 4096, d_out = 11008, r_u = 16 would otherwise gather 720M floats).
_GATHER_LIMIT = 1 << 24


def _per_user_matvec(W: Tensor, v: Tensor, safe: Tensor, vmask: Tensor) -> Tensor:
    """out_t = W[u_t] v_t for W [N, m, k], v [T, k], times vmask (0 for u = -1)."""
    T, m, k = v.shape[0], W.shape[1], W.shape[2]
    if W.shape[0] == 0:  # an empty bank: every id is -1, nothing to gather
        return v.new_zeros(T, m)
    if T * m * k <= _GATHER_LIMIT:
        return torch.bmm(W[safe], v.unsqueeze(-1)).squeeze(-1) * vmask
    order = torch.argsort(safe, stable=True)
    users, counts = torch.unique_consecutive(safe[order], return_counts=True)
    parts = [v[idx] @ W[u].t() for u, idx in zip(users.tolist(), order.split(counts.tolist()))]
    return torch.cat(parts)[torch.argsort(order)] * vmask


def lora_mixture_ref(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, adapters: Adapters = Adapters(),
    user_ids: Optional[Tensor] = None, *, d_out: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Vectorised reference. x [T, d_in], user_ids [T] (int, -1 = no user).

    Returns (y [T, d_out] in x.dtype, gates [T, K] in the compute dtype or None when
    the layer has no experts). ``d_out`` is needed only when nothing else fixes it.
    The math is :func:`lora_mixture_ref_loop`'s.
    """
    cd, xc, T, d_out = _prepare(x, weight, bias, adapters, user_ids, d_out)
    (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
     expert_scale, user_scale, top_k) = adapters
    y = xc.new_zeros(T, d_out)
    if weight is not None:
        y = y + xc @ weight.to(cd).t()
    if bias is not None:
        y = y + bias.to(cd)

    has_user = user_ids is not None
    if has_user:
        ids = user_ids.long()
        valid = ids >= 0
        safe = ids.clamp(min=0)
        vmask = valid.to(cd).unsqueeze(-1)

    z = None
    if user_A is not None:
        # z_t = A_u x_t per token; tokens without a user get zeros.
        z = _per_user_matvec(user_A.to(cd), xc, safe, vmask)

    K = expert_A.shape[0] if expert_A is not None else 0  # the gates exist only with experts
    gates = None
    if expert_A is not None:
        logits = xc.new_zeros(T, K)
        if router_weight is not None:
            logits = logits + xc @ router_weight.to(cd).t()
        if user_logit_bias is not None and user_logit_bias.shape[0] > 0:  # N = 0: ids all -1
            logits = logits + user_logit_bias.to(cd)[safe] * vmask
        if user_router is not None:
            logits = logits + _per_user_matvec(user_router.to(cd), z, safe, vmask)
        gates = gates_from_logits(logits, top_k)
        Kr, r = expert_A.shape[0] * expert_A.shape[1], expert_A.shape[1]
        # The group part is one rank-(K r) LoRA with a per-token diagonal gate.
        h = xc @ expert_A.to(cd).reshape(Kr, -1).t()  # [T, K r]
        hg = h * gates.repeat_interleave(r, dim=-1)
        B_cat = expert_B.to(cd).permute(1, 0, 2).reshape(d_out, Kr)  # [d_out, K r]
        y = y + expert_scale * (hg @ B_cat.t())
    if user_B is not None:
        y = y + user_scale * _per_user_matvec(user_B.to(cd), z, safe, vmask)
    return y.to(x.dtype), gates


def lora_mixture_ref_loop(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, adapters: Adapters = Adapters(),
    user_ids: Optional[Tensor] = None, *, d_out: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Readable reference, the spec in code: one segment of tokens per user, one
    expert at a time, every term as the formula of this module reads.

    Same arguments and result as :func:`lora_mixture_ref`.
    """
    cd, xc, T, d_out = _prepare(x, weight, bias, adapters, user_ids, d_out)
    (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
     expert_scale, user_scale, top_k) = adapters
    K = expert_A.shape[0] if expert_A is not None else 0  # the gates exist only with experts
    ids = user_ids.long() if user_ids is not None else torch.full((T,), -1, device=x.device)

    rows, gate_rows = [None] * T, [None] * T
    for u in ids.unique().tolist():
        tok = (ids == u).nonzero().squeeze(-1)
        xs = xc[tok]  # this user's segment, [n, d_in]
        ys = xs.new_zeros(len(tok), d_out)
        if weight is not None:
            ys = ys + xs @ weight.to(cd).t()
        if bias is not None:
            ys = ys + bias.to(cd)
        z = None
        if u >= 0 and user_A is not None:
            z = xs @ user_A[u].to(cd).t()  # user code
        if expert_A is not None:
            logits = xs.new_zeros(len(tok), K)
            if router_weight is not None:
                logits = logits + xs @ router_weight.to(cd).t()
            if u >= 0 and user_logit_bias is not None:
                logits = logits + user_logit_bias[u].to(cd)
            if u >= 0 and user_router is not None:
                logits = logits + z @ user_router[u].to(cd).t()
            g = gates_from_logits(logits, top_k)
            for k in range(K):
                expert_k = (xs @ expert_A[k].to(cd).t()) @ expert_B[k].to(cd).t()
                ys = ys + expert_scale * g[:, k : k + 1] * expert_k
            for i, t in enumerate(tok.tolist()):
                gate_rows[t] = g[i]
        if u >= 0 and user_B is not None:
            ys = ys + user_scale * (z @ user_B[u].to(cd).t())
        for i, t in enumerate(tok.tolist()):
            rows[t] = ys[i]
    y = torch.stack(rows) if T else xc.new_zeros(0, d_out)
    gates = None
    if expert_A is not None:
        gates = torch.stack(gate_rows) if T else xc.new_zeros(0, K)
    return y.to(x.dtype), gates


def _infer_d_out(weight, bias, expert_B, user_B) -> int:
    if weight is not None:
        return weight.shape[0]
    if bias is not None:
        return bias.shape[0]
    if expert_B is not None:
        return expert_B.shape[1]
    if user_B is not None:
        return user_B.shape[1]
    raise ValueError("d_out is undefined: pass weight, bias, expert_B or user_B (or d_out=)")
