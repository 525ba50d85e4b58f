"""Every way of computing an adapted linear that the benchmark compares.

A provider turns the parameters of one or more adapted linears (one per projection:
a single one for ``fwd``/``fwdbwd``/``decode``, gate/up/down for ``mlp``) into
callables ``f(x) -> y``. ``compose`` chains them into the op; the benchmark times the
result. Providers import their heavy dependencies (triton, peft) lazily and say why
they cannot run with :class:`Skip`.

* ``base``          the base linear alone (the floor)
* ``reference``     ``proper_kernels.reference.lora_mixture_ref`` (vectorised gathers)
* ``auto``          ``lora_mixture(..., backend="auto")``: the path a user gets by default
* ``loop``          a PEFT/MixLoRA-style Python loop over users and experts
* ``torch``         the fastest plain torch we have: one shrink GEMM over
                    [A_g; W_r; A_u of every user], a one-hot mask in rank space, one
                    expand GEMM (rank N r_u, so only for small banks); a per-user
                    segment loop over the sorted tokens for large banks
* ``torch-compile`` ``torch``'s formulation under ``torch.compile``
* ``peft``          HF PEFT's mixed batch (``adapter_names=``): users only, no experts
* ``triton``        ``lora_mixture(..., backend="triton")``
* ``cuda``          ``lora_mixture(..., backend="cuda")``: decode only, no grad
* ``cuda-one``      the same CUDA decode kernel in its single cooperative launch
                    (``lora_mixture_decode_cuda(..., launch="one")``)
"""
from __future__ import annotations

import abc
import importlib
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

PROVIDERS = ("base", "reference", "auto", "loop", "torch", "torch-compile", "peft", "triton", "cuda", "cuda-one")

# The tensors of one adapted linear that get gradients in ``fwdbwd`` (W0 and b are frozen,
# as in every PROPER stage after the population merge).
GRAD_PARAMS = ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router")

# torch's one-hot formulation multiplies by every user of the bank; beyond this many
# rank rows (N * r_u) it switches to a per-user segment loop.
WIDE_MAX_RANK = 2048


class Skip(Exception):
    """The provider cannot run this case here; the message says why."""


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False


def strip_params(p: Dict[str, object], work: str) -> Dict[str, object]:
    """The parameters of the work a provider does: "full", "users" (no experts/router) or "base"."""
    q = dict(p)
    if work in ("users", "base"):
        for name in ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_router"):
            q[name] = None
    if work == "base":
        q["user_A"] = q["user_B"] = None
    return q


# --------------------------------------------------------------------------- formulations
def reference_linear(x: Tensor, p: Dict[str, object], ids: Tensor) -> Tensor:
    from proper_kernels.reference import Adapters, lora_mixture_ref

    y, _ = lora_mixture_ref(x, p["weight"], p["bias"], Adapters.from_kwargs(p), ids)
    return y


def loop_linear(x: Tensor, p: Dict[str, object], ids: Tensor, active: List[int]) -> Tensor:
    """PEFT-style: base, then one small matmul chain per expert and per user segment.

    Runs entirely in x's dtype (no upcast): it is also the "same-dtype plain PyTorch"
    computation whose error sets the refcheck tolerance.
    """
    T = x.shape[0]
    y = F.linear(x, p["weight"], p["bias"])
    A_u, B_u, V = p["user_A"], p["user_B"], p["user_router"]
    A_g = p["expert_A"]
    segs = [(u, (ids == u).nonzero().squeeze(-1)) for u in active if u >= 0]
    z = None
    if A_u is not None:
        z = x.new_zeros(T, A_u.shape[1])
        for u, idx in segs:
            z = z.index_copy(0, idx, x[idx] @ A_u[u].t())
    if A_g is not None:
        K = A_g.shape[0]
        logits = x.new_zeros(T, K)
        if p["router_weight"] is not None:
            logits = logits + x @ p["router_weight"].t()
        for u, idx in segs:
            lu = x.new_zeros(len(idx), K)
            if p["user_logit_bias"] is not None:
                lu = lu + p["user_logit_bias"][u]
            if V is not None:
                lu = lu + z[idx] @ V[u].t()
            logits = logits.index_add(0, idx, lu)
        g = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        for k in range(K):
            y = y + p["expert_scale"] * g[:, k:k + 1] * ((x @ A_g[k].t()) @ p["expert_B"][k].t())
    if A_u is not None:
        for u, idx in segs:
            y = y.index_add(0, idx, p["user_scale"] * (z[idx] @ B_u[u].t()))
    return y


def pack_wide(p: Dict[str, object]) -> Dict[str, Optional[Tensor]]:
    """Stack one layer's weights for torch_linear: the shrink [K r + K + N r_u, d_in],
    the LoRA-aware router in rank space [N r_u, K] and the expand [d_out, K r + N r_u]."""
    A_g, B_g, W_r = p["expert_A"], p["expert_B"], p["router_weight"]
    A_u, B_u, V = p["user_A"], p["user_B"], p["user_router"]
    shrink, expand = [], []
    if A_g is not None:
        K, r, d_in = A_g.shape
        shrink.append(A_g.reshape(K * r, d_in))
        if W_r is not None:
            shrink.append(W_r)
        expand.append(p["expert_scale"] * B_g.permute(1, 0, 2).reshape(B_g.shape[1], K * r))
    if A_u is not None:
        Nu, r_u, d_in = A_u.shape
        shrink.append(A_u.reshape(Nu * r_u, d_in))
        expand.append(p["user_scale"] * B_u.permute(1, 0, 2).reshape(B_u.shape[1], Nu * r_u))
    return {
        "shrink": torch.cat(shrink, 0) if shrink else None,
        "expand": torch.cat(expand, 1) if expand else None,
        "V": V.permute(0, 2, 1).reshape(-1, V.shape[1]) if V is not None else None,
    }


def torch_linear(x: Tensor, p: Dict[str, object], ids: Tensor, packed: Dict[str, Optional[Tensor]]) -> Tensor:
    """Vectorised plain torch with no host sync (CUDA-graph and compile friendly).

    H = x [A_g; W_r; A_u(all users)]^T in one GEMM; each token keeps only its own
    user's r_u columns (one-hot mask); gates from the router columns; one expand GEMM
    over [s_g B_g | s_u B_u(all users)] of the gated, masked rank vector.
    """
    A_g, A_u = p["expert_A"], p["user_A"]
    packed = packed if packed is not None else pack_wide(p)
    y = F.linear(x, p["weight"], p["bias"])
    if packed["shrink"] is None:
        return y
    H = x @ packed["shrink"].t()
    parts = []
    valid = ids >= 0
    safe = ids.clamp(min=0)
    col = 0
    h = z = None
    if A_g is not None:
        K, r = A_g.shape[0], A_g.shape[1]
        h = H[:, :K * r]
        col = K * r
        logits = None
        if p["router_weight"] is not None:
            logits = H[:, col:col + K]
            col += K
    if A_u is not None:
        Nu, r_u = A_u.shape[0], A_u.shape[1]
        onehot = (safe.unsqueeze(1) == torch.arange(Nu, device=x.device).unsqueeze(0)) & valid.unsqueeze(1)
        z = H[:, col:] * onehot.to(x.dtype).repeat_interleave(r_u, dim=1)
    if A_g is not None:
        lg = logits.float() if logits is not None else x.new_zeros(x.shape[0], K, dtype=torch.float32)
        if p["user_logit_bias"] is not None:
            lg = lg + p["user_logit_bias"][safe].float() * valid.unsqueeze(1)
        if packed["V"] is not None:
            lg = lg + (z @ packed["V"]).float()
        g = torch.softmax(lg, dim=-1).to(x.dtype)
        parts.append(h * g.repeat_interleave(r, dim=1))
    if z is not None:
        parts.append(z)
    hz = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return y + hz @ packed["expand"].t()


def segment_linear(x: Tensor, p: Dict[str, object], ids: Tensor, segs) -> Tensor:
    """torch for large banks: the group part as two dense GEMMs, the user part one GEMM
    pair per user segment of the routing plan (``segs``: list of (user, token index))."""
    y = F.linear(x, p["weight"], p["bias"])
    A_g, A_u = p["expert_A"], p["user_A"]
    z = None
    if A_u is not None:
        z = x.new_zeros(x.shape[0], A_u.shape[1])
        for u, idx in segs:
            z = z.index_copy(0, idx, x[idx] @ A_u[u].t())
    if A_g is not None:
        K, r, d_in = A_g.shape
        valid = (ids >= 0).unsqueeze(1)
        safe = ids.clamp(min=0)
        lg = x.new_zeros(x.shape[0], K, dtype=torch.float32)
        if p["router_weight"] is not None:
            lg = lg + (x @ p["router_weight"].t()).float()
        if p["user_logit_bias"] is not None:
            lg = lg + p["user_logit_bias"][safe].float() * valid
        if p["user_router"] is not None:
            lg = lg + torch.bmm(p["user_router"][safe], z.unsqueeze(-1)).squeeze(-1).float()
        g = torch.softmax(lg, dim=-1).to(x.dtype)
        h = x @ A_g.reshape(K * r, d_in).t()
        B_cat = p["expert_B"].permute(1, 0, 2).reshape(-1, K * r)
        y = y + p["expert_scale"] * ((h * g.repeat_interleave(r, dim=1)) @ B_cat.t())
    if A_u is not None:
        for u, idx in segs:
            y = y.index_add(0, idx, p["user_scale"] * (z[idx] @ p["user_B"][u].t()))
    return y


# --------------------------------------------------------------------------- providers
class Provider(abc.ABC):
    """name, a one-line description, what work it does ("full", "users" or "base").

    :meth:`skip_reason` says whether it runs a case here; :meth:`note_for` what it does
    where that differs from the others; :meth:`graph_safe` whether its step has no host
    syncs (so it may be timed as a CUDA graph replay).
    """
    name = ""
    doc = ""
    work = "full"
    note = ""
    grad = True       # supports fwdbwd
    no_grad_reason = "forward only (no backward)"
    decode_only = False

    def op_skip_reason(self, case) -> Optional[str]:
        """Why this provider never computes ``case``'s op, on any device, or None."""
        if case.grad and not self.grad:
            return f"{self.name}: {self.no_grad_reason}"
        if self.decode_only and case.op != "decode":
            return f"{self.name}: decode kernel, only --op decode"
        return None

    def unavailable(self, case, device: torch.device) -> Optional[str]:
        """What this machine or the case's inputs lack for this provider (no name prefix), or None."""
        return None

    def skip_reason(self, case, device: torch.device) -> Optional[str]:
        """None if this provider can run ``case`` on ``device``, else "<name>: why". What
        the machine lacks comes first: it is the one reason for every case."""
        why = self.unavailable(case, device)
        return f"{self.name}: {why}" if why else self.op_skip_reason(case)

    def note_for(self, case, layers, x: Tensor, ids: Tensor, plan) -> str:
        """What this provider does on the case where it differs from the others (the row's note)."""
        return self.note

    def graph_safe(self, case) -> bool:
        return True

    @abc.abstractmethod
    def compose(self, case, layers, ids, plan) -> Callable[[Tensor], Tensor]:
        """The op as a function of x: one linear, or the gated MLP over gate/up/down."""


class LayerwiseProvider(Provider):
    """A provider made of one function of x per projection (``setup``), chained by
    :func:`compose_op` (PEFT, which wraps all projections in one module, is not)."""

    @abc.abstractmethod
    def setup(self, case, layers: List[Dict[str, object]], ids: Tensor, plan) -> List[Callable[[Tensor], Tensor]]:
        """One function of x per projection of the case."""

    def compose(self, case, layers, ids, plan) -> Callable[[Tensor], Tensor]:
        return compose_op(case.op, self.setup(case, layers, ids, plan))


def compose_op(op: str, fns):
    if op == "mlp":
        gate, up, down = fns
        return lambda x: down(F.silu(gate(x)) * up(x))
    (f,) = fns
    return f


class BaseProvider(LayerwiseProvider):
    name, doc, work = "base", "the base linear alone (the floor)", "base"
    note = "base linear only (no adapters): the floor"

    def setup(self, case, layers, ids, plan):
        return [lambda x, p=p: F.linear(x, p["weight"], p["bias"]) for p in layers]


class ReferenceProvider(LayerwiseProvider):
    name, doc = "reference", "proper_kernels.reference.lora_mixture_ref (vectorised gathers)"

    def setup(self, case, layers, ids, plan):
        return [lambda x, p=p: reference_linear(x, p, ids) for p in layers]


class LoopProvider(LayerwiseProvider):
    name, doc = "loop", "PEFT/MixLoRA-style Python loop over users and experts"

    def graph_safe(self, case) -> bool:
        return False

    def setup(self, case, layers, ids, plan):
        active = plan.active_users.tolist() if plan is not None else sorted(set(ids.tolist()))
        return [lambda x, p=p: loop_linear(x, p, ids, active) for p in layers]


class TorchProvider(LayerwiseProvider):
    name, doc = "torch", "vectorised plain torch (one-hot rank space, or segment loop for big banks)"

    def formulation(self, case) -> str:
        return "wide" if case.N * case.r_u <= WIDE_MAX_RANK else "segment"

    def graph_safe(self, case) -> bool:
        return self.formulation(case) == "wide"

    def note_for(self, case, layers, x, ids, plan) -> str:
        if self.formulation(case) == "wide":
            return "one-hot rank space: shrink/expand over all N users' ranks"
        return "group part dense, user part a loop over user segments"

    def setup(self, case, layers, ids, plan):
        if self.formulation(case) == "wide":
            fns = []
            for p in layers:
                # Without grad a deployed layer keeps the packed weights; with grad they are
                # packed inside the step so the gradients reach the original tensors.
                packed = None if case.grad else pack_wide(p)
                fns.append(lambda x, p=p, packed=packed: torch_linear(x, p, ids, packed if packed is not None else pack_wide(p)))
            return fns
        order = plan.order.long()
        segs = [(u, order[s:e]) for u, s, e in plan.segments()]
        return [lambda x, p=p: segment_linear(x, p, ids, segs) for p in layers]


class TorchCompileProvider(TorchProvider):
    name, doc = "torch-compile", "the torch formulation under torch.compile"

    def unavailable(self, case, device):
        return None if hasattr(torch, "compile") else "this torch has no torch.compile"

    def note_for(self, case, layers, x, ids, plan) -> str:
        return "torch.compile of torch's " + ("one-hot formulation" if self.formulation(case) == "wide" else "segment loop")

    def compose(self, case, layers, ids, plan):
        fn = super().compose(case, layers, ids, plan)
        return torch.compile(fn, dynamic=False)


class PeftProvider(Provider):
    name, doc, work = "peft", "HF PEFT mixed batch (adapter_names=), one LoRA per user", "users"
    note = "PEFT: users' LoRAs only (no gated experts, no router): less work than the others"
    grad = False
    no_grad_reason = "mixed-batch adapter_names is inference-only (PEFT refuses it in training mode)"

    def graph_safe(self, case) -> bool:
        return False

    def unavailable(self, case, device):
        if not _importable("peft"):
            return "not installed (pip install peft)"
        if case.r_u == 0:
            return "the case has no user adapters"
        return None

    def compose(self, case, layers, ids, plan):
        from peft import LoraConfig, get_peft_model
        from torch import nn

        names = ["lin"] if case.op != "mlp" else ["gate_proj", "up_proj", "down_proj"]
        p0 = layers[0]
        dtype, device = p0["weight"].dtype, p0["weight"].device

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                for name, p in zip(names, layers):
                    d_out, d_in = p["weight"].shape
                    setattr(self, name, nn.Linear(d_in, d_out, bias=p["bias"] is not None))

            def forward(self, x):
                if len(names) == 1:
                    return self.lin(x)
                return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

        net = Net().to(device=device, dtype=dtype)
        with torch.no_grad():
            for name, p in zip(names, layers):
                getattr(net, name).weight.copy_(p["weight"])
                if p["bias"] is not None:
                    getattr(net, name).bias.copy_(p["bias"])
        r_u = case.r_u
        cfg = LoraConfig(r=r_u, lora_alpha=float(p0["user_scale"]) * r_u, lora_dropout=0.0,
                         target_modules=names, init_lora_weights=False)
        model = get_peft_model(net, cfg, adapter_name="u0")
        for u in range(1, case.N):
            model.add_adapter(f"u{u}", cfg)
        model = model.to(device=device, dtype=dtype)
        with torch.no_grad():
            for name, p in zip(names, layers):
                mod = model.base_model.model.get_submodule(name)
                for u in range(case.N):
                    mod.lora_A[f"u{u}"].weight.copy_(p["user_A"][u])
                    mod.lora_B[f"u{u}"].weight.copy_(p["user_B"][u])
        model.eval()
        adapter_names = ["__base__" if u < 0 else f"u{u}" for u in ids.tolist()]

        def run(x):
            # PEFT takes one adapter per batch row: every token is its own row.
            return model(x.unsqueeze(1), adapter_names=adapter_names).squeeze(1)

        return run


class TritonProvider(LayerwiseProvider):
    name, doc = "triton", 'lora_mixture(..., backend="triton")'

    def unavailable(self, case, device):
        if device.type != "cuda":
            return "needs CUDA (TRITON_INTERPRET=1 on CPU is far too slow to time)"
        if not _importable("triton"):
            return "not installed"
        for mod, what in (("proper_kernels.triton.mixture_fwd", "forward"), ("proper_kernels.ops.autograd", "ops")):
            if not _importable(mod):
                return f"{mod} is not importable (the {what} kernels are missing)"
        if case.grad and not _importable("proper_kernels.triton.mixture_bwd"):
            return "proper_kernels.triton.mixture_bwd is not importable (no backward kernel yet)"
        return None

    def note_for(self, case, layers, x, ids, plan) -> str:
        """The path ``lora_mixture(backend="triton")`` takes on these inputs
        (``proper_kernels.explain``) and, with the forward kernels, their variant."""
        from proper_kernels import explain

        p = layers[0]
        try:
            path = explain(x, p["weight"], p["bias"], user_ids=ids, plan=plan, backend="triton", **adapter_kwargs(p))
        except Exception as exc:  # noqa: BLE001 - the call itself will report it
            return f"explain failed: {exc}"
        if path.forward != "triton":
            return f"forward={path.forward}: {path.reason}"
        from proper_kernels.triton.mixture_fwd import forward_variant

        variant = forward_variant(case.T, case.d_in, case.d_out, has_weight=p["weight"] is not None, dtype=x.dtype,
                                  rank=case.K * case.r + case.r_u)
        return f"forward=triton variant={variant}"

    def setup(self, case, layers, ids, plan):
        return [_op_fn(p, ids, plan, "triton") for p in layers]


class AutoProvider(LayerwiseProvider):
    name, doc = "auto", 'lora_mixture(..., backend="auto"): the path a user gets by default'

    def unavailable(self, case, device):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 would send it to the Triton CPU interpreter (far too slow to time)"
        return None

    def graph_safe(self, case) -> bool:
        return False  # the torch backend's segment variant reads the plan's segments on the host

    def note_for(self, case, layers, x, ids, plan) -> str:
        """The path ``lora_mixture`` takes here (``proper_kernels.explain``)."""
        from proper_kernels import explain

        p = layers[0]
        try:
            path = explain(x, p["weight"], p["bias"], user_ids=ids, plan=plan, backend="auto", **adapter_kwargs(p))
        except Exception as exc:  # noqa: BLE001 - the call itself will report it
            return f"explain failed: {exc}"
        return f"path={path.backend} ({path.forward})"

    def setup(self, case, layers, ids, plan):
        return [_op_fn(p, ids, plan, "auto") for p in layers]


class CudaProvider(LayerwiseProvider):
    name, doc = "cuda", 'lora_mixture(..., backend="cuda"): decode kernel, forward only'
    grad = False
    decode_only = True

    def unavailable(self, case, device):
        if device.type != "cuda":
            return "needs a CUDA device"
        try:
            mod = importlib.import_module("proper_kernels.ops.cuda_decode")
        except Exception as exc:  # noqa: BLE001
            return f"proper_kernels.ops.cuda_decode not importable ({type(exc).__name__}: {exc})"
        try:
            if not mod.available():
                return "extension not built (proper_kernels._C missing: pip install -e . with nvcc)"
        except Exception as exc:  # noqa: BLE001
            return f"available() failed ({exc})"
        return None

    def setup(self, case, layers, ids, plan):
        return [_op_fn(p, ids, plan, "cuda") for p in layers]


class CudaOneProvider(CudaProvider):
    name, doc = "cuda-one", 'lora_mixture_decode_cuda(..., launch="one"): the decode kernel as one cooperative launch'

    def setup(self, case, layers, ids, plan):
        from proper_kernels.ops.cuda_decode import lora_mixture_decode_cuda
        from proper_kernels.reference import Adapters

        return [lambda x, p=p: lora_mixture_decode_cuda(x, p["weight"], p["bias"], Adapters.from_kwargs(p),
                                                        user_ids=ids, plan=plan, launch="one") for p in layers]


def adapter_kwargs(p: Dict[str, object]) -> Dict[str, object]:
    """The adapter keywords of ``lora_mixture`` (and ``explain``) from one layer's parameters."""
    from proper_kernels.reference import Adapters

    return Adapters.from_kwargs(p)._asdict()


def _op_fn(p, ids, plan, backend):
    """x -> lora_mixture(x, ...) on one layer's parameters, its keywords built once
    (as a model's layer holds its tensors)."""
    from proper_kernels import lora_mixture

    weight, bias, kw = p["weight"], p["bias"], adapter_kwargs(p)
    return lambda x: lora_mixture(x, weight, bias, **kw, user_ids=ids, plan=plan, backend=backend)


REGISTRY: Dict[str, Provider] = {
    p.name: p for p in (BaseProvider(), ReferenceProvider(), AutoProvider(), LoopProvider(), TorchProvider(),
                        TorchCompileProvider(), PeftProvider(), TritonProvider(), CudaProvider(), CudaOneProvider())
}
assert tuple(REGISTRY) == PROVIDERS
