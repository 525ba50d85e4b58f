"""The torch backend's wide variant: every token against every user of a small bank,
as torch ops (a one-hot mask over the bank's rank columns) or, on the CPU, as the C++
kernels of ``csrc/cpu/wide_layer.cpp`` (the user terms per token on its own user's
rows; with gradients one C++ autograd node)."""
from __future__ import annotations

import importlib
import os
from functools import partial
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype, gates_from_logits
from .packs import _build_cols, _build_router, _build_rows, _cast, _packed
from .torch_routing import _Routing


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
    cols = [_build_cols(cd, B) for B in (B_g, B_u) if B is not None]
    E = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    return _Wide(_build_rows(cd, A_g, A_u, W_r), E, _build_router(cd, V) if V is not None else None, _cast(c, cd))


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
            _cast(x, cd).contiguous(), _cast(weight, cd), _cast(bias, cd), k.Sg, k.Eg, k.Au, k.Bu, _ids32(rt), k.c, k.V,
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


