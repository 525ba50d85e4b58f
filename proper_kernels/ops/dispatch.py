"""Which implementation runs a call of :func:`proper_kernels.lora_mixture`, and why.

:func:`choose_path` is the one place that decides: the backend asked for (argument,
else ``$PROPER_KERNELS_BACKEND``, else ``auto``), every fallback, and the reason for
each. The launchers and kernels behind it assume inputs it sent them; they do not
choose again. :func:`explain` gives a user the same decision without running it.

Paths:

* ``base``       no adapter tensor at all: the base linear ``F.linear`` itself.
* ``reference``  the vectorised PyTorch reference, differentiated by autograd (the
                 oracle; only by name).
* ``torch``      the rank-space contract as a few GEMMs with a hand-written backward
                 (``proper_kernels.ops.torch_backend``), in its ``wide`` or
                 ``segment`` variant: the default where no kernel runs.
* ``triton``     the fused Triton forward and backward kernels (custom ops). With a
                 dtype the forward kernels do not compile (fp64) the forward runs the
                 rank-space torch contract and the backward kernels still run.
* ``cuda``       the CUDA decode kernel (forward only, small inference batches).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..reference.adapters import Adapters
from ..runtime.target import interpreter_problem
from . import cuda_decode, torch_backend
from .plan import RoutingPlan
from .validate import MixtureSpec, check_mixture_args

__all__ = ["BACKENDS", "Path", "choose_path", "explain", "available_backends", "requested_backend"]

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
# The dtypes the Triton forward kernels compile for; others run the rank-space forward.
TRITON_FORWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read once: torch.compile traces the dispatch, and a constant is all it needs to see.
_INTERPRETER_PROBLEM: Optional[str] = interpreter_problem()


class Path(NamedTuple):
    """The decision for one call.

    Attributes:
        backend:   "base", "reference", "torch", "triton" or "cuda" (see the module docstring).
        requested: what was asked for (one of :data:`BACKENDS`).
        reason:    why this path, in words.
        forward:   the implementation within the backend: on the triton path the
                   forward's, "triton" (kernels) or "torch" (the rank-space contract,
                   for dtypes without forward kernels); on the torch path its variant,
                   "wide" or "segment"; equal to ``backend`` on the other paths.
    """

    backend: str
    requested: str
    reason: str
    forward: str


def _module(name: str):
    # sys.modules first: torch.compile traces a dict lookup but not importlib.
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` in this process, or None."""
    if _module("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"no Triton kernels for {device.type} tensors"
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "x is a CPU tensor and TRITON_INTERPRET=1 is not set"
    return _INTERPRETER_PROBLEM


def _interpreter_unsupported(device: torch.device, tensors) -> Optional[str]:
    """Why the Triton CPU interpreter cannot run these tensors, or None.

    Its ``tl.dot`` returns garbage for bfloat16 operands (triton 3.x; magnitudes
    around 1e10 instead of O(1)), in the forward and in the backward, so a bfloat16
    tensor must never reach the kernels there. Compiled kernels on CUDA are fine.
    """
    if device.type == "cpu" and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        return "the Triton CPU interpreter computes tl.dot wrongly for bfloat16 (use float16/float32)"
    return None


def _cuda_unusable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"x is a {device.type} tensor (the CUDA decode kernel needs CUDA tensors)"
    if not cuda_decode.available():
        return cuda_decode.unavailable_reason()
    return None


def available_backends(device: torch.device | str = "cpu") -> list:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = ["reference", "torch"]
    if _triton_unusable(device) is None:
        out.append("triton")
    if _cuda_unusable(device) is None:
        out.append("cuda")
    return out


def requested_backend(requested: Optional[str]) -> str:
    """The backend asked for: ``requested``, else $PROPER_KERNELS_BACKEND, else "auto"; checked."""
    if requested:
        source = "backend"
    else:
        requested = os.environ.get("PROPER_KERNELS_BACKEND") or "auto"
        source = "backend (from $PROPER_KERNELS_BACKEND)"
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    return requested


def _triton_path(x: Tensor, requested: str, reason: str) -> Path:
    if x.dtype in TRITON_FORWARD_DTYPES:
        return Path("triton", requested, reason, "triton")
    return Path("triton", requested, f"{reason}; the forward kernels have no {x.dtype} variant, so the "
                "forward runs the rank-space torch contract and the backward runs the kernels", "torch")


def _torch_path(x: Tensor, spec: MixtureSpec, requested: str, reason: str) -> Path:
    variant, why = torch_backend.choose_variant(spec.N, spec.r_u, spec.K, x.device,
                                                traced=torch.compiler.is_compiling())
    return Path("torch", requested, f"{reason}: the torch backend, {variant} variant ({why})", variant)


def choose_path(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], adapters: Adapters,
                spec: MixtureSpec, user_ids: Optional[Tensor], requested: Optional[str]) -> Path:
    """The path of one call on validated arguments (``spec`` from check_mixture_args).

    ``requested=None`` reads $PROPER_KERNELS_BACKEND, else "auto". A backend asked for
    by name runs or raises saying why it cannot; ``auto`` takes, in order: the base
    linear when there is nothing to adapt; the CUDA decode kernel for inference
    batches up to the decode table's T on a GPU whose entry is measured; the Triton
    kernels on CUDA (and on CPU under TRITON_INTERPRET=1, except bfloat16); else the
    torch backend (faster than the reference, which runs only by name).
    """
    requested = requested_backend(requested)
    tensors = (x, weight, bias) + adapters.tensors()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if requested == "torch":
        return _torch_path(x, spec, requested, "backend='torch' was requested")
    if spec.T == 0:
        return Path("reference", requested, "no tokens (T = 0)", "reference")
    if requested in ("auto", "reference") and adapters.is_empty() and weight is not None \
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        return Path("base", requested, "no adapter tensor: the base linear alone", "base")
    if requested == "reference":
        return Path("reference", requested, "backend='reference' was requested", "reference")

    if requested == "triton":
        why = _triton_unusable(x.device)
        if why is not None:
            raise RuntimeError(f"backend='triton' is not usable on {x.device}: it needs triton and a CUDA device "
                               f"(or TRITON_INTERPRET=1 on CPU); here {why}")
        why = _interpreter_unsupported(x.device, tensors)
        if why is not None:
            raise RuntimeError(f"backend='triton' cannot run these inputs on {x.device}: {why}, "
                               "or backend='reference'")
        return _triton_path(x, requested, "backend='triton' was requested")

    if requested == "cuda":
        why = _cuda_unusable(x.device)
        if why is not None:
            raise RuntimeError(f"backend='cuda' is not usable on {x.device}: it needs the built "
                               f"proper_kernels._C extension and a CUDA tensor; here {why}")
        if needs_grad:
            raise RuntimeError("backend='cuda' is forward-only (decode): run it under torch.no_grad() or use 'triton'")
        return Path("cuda", requested, "backend='cuda' was requested", "cuda")

    # auto
    notes = []
    why = _cuda_unusable(x.device)
    if why is None:
        limit = cuda_decode.decode_threshold(x.device, x.dtype)
        if needs_grad:
            notes.append("CUDA decode is forward-only and an input requires grad")
        elif spec.T > limit:
            notes.append(f"T = {spec.T} is above the CUDA decode limit {limit} (decode table / "
                         "PROPER_KERNELS_CUDA_DECODE_MAX_T)")
        elif (unsupported := cuda_decode.unsupported_reason(x.reshape(spec.T, spec.d_in), weight, bias, adapters,
                                                            user_ids)) is not None:
            notes.append(f"CUDA decode cannot take these inputs: {unsupported}")
        else:
            return Path("cuda", requested, f"inference batch of T = {spec.T} <= {limit} on a GPU with the "
                        "CUDA decode kernel", "cuda")
    why = _triton_unusable(x.device) or _interpreter_unsupported(x.device, tensors)
    if why is None:
        return _triton_path(x, requested, "; ".join(notes + ["Triton kernels usable on " + str(x.device)]))
    notes.append(f"no Triton: {why}")
    return _torch_path(x, spec, requested, "; ".join(notes))


def choose_path_cached(memo: Optional[dict], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       adapters: Adapters, spec: MixtureSpec, user_ids: Optional[Tensor],
                       requested: Optional[str], grad: bool) -> Path:
    """:func:`choose_path`, remembered in ``memo`` (the dict validation keeps for the
    arguments' signature: :func:`~proper_kernels.ops.validate.check_and_sign`) for CPU
    calls, by what was requested, the two environment variables the CPU dispatch reads
    and whether a gradient is needed (``grad``): everything choose_path reads there."""
    if memo is None or x.device.type != "cpu":
        return choose_path(x, weight, bias, adapters, spec, user_ids, requested)
    env = os.environ  # the backend variable counts only when no backend is named
    key = (requested, None if requested else env.get("PROPER_KERNELS_BACKEND"), env.get("TRITON_INTERPRET"), grad)
    path = memo.get(key)
    if path is None:
        path = memo[key] = choose_path(x, weight, bias, adapters, spec, user_ids, requested)
    return path


def explain(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, *, user_ids=None,
            plan: Optional[RoutingPlan] = None, backend: Optional[str] = None, return_gates: bool = False,
            **adapter_kwargs) -> Path:
    """The :class:`Path` that ``lora_mixture`` would take for these arguments (same
    keywords; ``return_gates`` does not change the path), without running it.
    Validates the arguments exactly as the op does.

        >>> pk.explain(x, W0, expert_A=A, expert_B=B).reason
    """
    unknown = sorted(set(adapter_kwargs) - set(Adapters._fields))
    if unknown:
        raise TypeError(f"explain() got unexpected keyword(s) {unknown}; it takes lora_mixture's: bias, user_ids, "
                        f"plan, backend, return_gates and {', '.join(Adapters._fields)}")
    adapters = Adapters(**adapter_kwargs)
    spec = check_mixture_args(x, weight, bias, adapters, user_ids, plan)
    ids = plan.user_ids if plan is not None else (user_ids.reshape(spec.T) if user_ids is not None else None)
    return choose_path(x, weight, bias, adapters, spec, ids, backend)
