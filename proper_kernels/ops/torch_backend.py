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
of frozen adapter tensors are kept between calls.

:func:`choose_variant` picks one; the dispatch (``proper_kernels.ops.dispatch.
choose_path``) calls it and reports the choice. This module holds the choice, the
autograd and the entry point; the parts live beside it: ``torch_routing`` (the
layouts of a batch), ``torch_wide`` and ``torch_segment`` (the two variants),
``packs`` (the packed layouts and their cache).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..reference.adapters import Adapters
from ..reference.mixture import compute_dtype
from .packs import _cast, clear_pack_cache
from .plan import RoutingPlan
from .torch_routing import ONE_USER_MIN_WASTE, _routing
from .torch_segment import _backward_segment, _forward_segment, _weights
from .torch_wide import _backward_wide, _cpu_kernels, _forward_wide, _ids32, _kernel_pack, _native_autograd, _wide_pack

__all__ = ["VARIANTS", "choose_variant", "clear_pack_cache", "lora_mixture_torch", "TorchMixtureFunction",
           "ONE_USER_MIN_WASTE"]

VARIANTS = ("wide", "segment")

# Wide's one-hot rank space is [T, N (r_u + K)]: beyond this width it is never taken,
# and on the CPU not beyond CPU_WIDE_MAX_RANK (see choose_variant).
WIDE_MAX_RANK = 4096
CPU_WIDE_MAX_RANK = 256
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
        if not x.is_contiguous():  # the kernels read rows of x in place
            tensors = (x.contiguous(),) + tensors[1:]
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
