"""CUDA decode path of the PROPER LoRA mixture (extension ``proper_kernels._C``).

The math is the reference's (``proper_kernels.reference.mixture``).
The base ``x W0^T + b`` is computed by torch (cuBLAS) into the output, then one call of
the extension adds the adapter delta into it: two kernels (shrink, then gates +
expand) or, with ``launch="one"``, a single cooperative kernel (see
csrc/lora_mixture_decode.cu). Forward only, meant for
decode batches of a few to a few hundred tokens; :func:`decode_threshold` says up to
which T it is preferred over the Triton path.

This module imports without a GPU and without the extension: :func:`available` then
returns False and :func:`lora_mixture_decode_cuda` raises RuntimeError. Every
argument is checked in Python (:func:`check_decode_args`) before any pointer reaches
CUDA.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..reference.adapters import ADAPTER_TENSORS, Adapters
from .validate import check_mixture_args

__all__ = [
    "available", "built_archs", "unavailable_reason", "decode_table", "decode_threshold", "prefers_cuda_decode",
    "check_decode_args", "lora_mixture_decode_cuda", "decode_checked", "run_extension", "use_extension", "mixture_decode_op", "launch_mode", "MAX_TOKENS", "MAX_EXPERTS", "MAX_RANK_TOTAL",
]

# Limits of the kernel; they mirror csrc/lora_mixture_decode.h, which re-checks them.
MAX_TOKENS = 4096  # T
MAX_EXPERTS = 64  # K
MAX_RANK_TOTAL = 1024  # K*r + r_u + K (the router rows, when router_weight is given)

# The one table that says for which T the CUDA decode kernel is preferred over the
# Triton kernels, per GPU architecture and dtype: decode_table.json beside this file,
# written by benchmarks/run.py --decode-table (see its "about"). Env override:
# PROPER_KERNELS_CUDA_DECODE_MAX_T.
_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_table.json")
_table_cache: Optional[List[dict]] = None
_table_index: Optional[dict] = None  # (arch, dtype) -> entry

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SHAPES = {
    "weight": "[d_out, d_in]", "bias": "[d_out]", "expert_A": "[K, r, d_in]", "expert_B": "[K, d_out, r]",
    "router_weight": "[K, d_in]", "user_logit_bias": "[N, K]", "user_A": "[N, r_u, d_in]",
    "user_B": "[N, d_out, r_u]", "user_router": "[N, K, r_u]",
}
_LAUNCH_CODES = {"two": 0, "one": 1}  # csrc/lora_mixture_decode.h: Launch

_ext = None
_ext_error: Optional[str] = None
_ext_tried = False


def _load():
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:
            _ext = importlib.import_module("proper_kernels._C")
        except (ImportError, OSError) as exc:
            _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def available() -> bool:
    """True when the extension ``proper_kernels._C`` is built and importable.

    It says nothing about a GPU being present: callers also need CUDA tensors."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    if _load() is not None:
        return None
    return ("the CUDA extension proper_kernels._C is not built (needs nvcc and pybind11 at "
            "install time: `pip install --no-build-isolation -e .`; see python/build_cuda.py); "
            f"import error: {_ext_error}")


def built_archs() -> List[str]:
    """Architectures compiled into the extension, e.g. ['sm_80', 'sm_90', 'compute_90'];
    [] without the extension."""
    ext = _load()
    return list(ext.built_archs()) if ext is not None else []


def decode_table() -> List[dict]:
    """The dispatch table's entries (a copy): dicts with arch ("sm_90", or "default"),
    dtype ("bfloat16", ..., or "*"), max_T, launch (optional: "two" or "one"),
    measured, source."""
    global _table_cache, _table_index
    if _table_cache is None:
        with open(_TABLE_PATH) as f:
            entries = json.load(f)["entries"]
        for e in entries:
            if (not {"arch", "dtype", "max_T"} <= set(e) or not isinstance(e["max_T"], int) or e["max_T"] < 0
                    or e.get("launch", "two") not in _LAUNCH_CODES):
                raise ValueError(f"{_TABLE_PATH}: bad entry {e!r} (needs arch, dtype, an int max_T >= 0 "
                                 "and launch 'two' or 'one' if any)")
        _table_cache = entries
        _table_index = {(e["arch"], e["dtype"]): e for e in entries}
    return [dict(e) for e in _table_cache]


def _arch_of(device) -> str:
    if device is None:
        return "default"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _table_entry(device, dtype) -> Optional[dict]:
    if _table_index is None:
        decode_table()
    arch = _arch_of(device)
    name = str(dtype).replace("torch.", "") if dtype is not None else "*"
    for key in ((arch, name), (arch, "*"), ("default", name), ("default", "*")):
        if key in _table_index:
            return _table_index[key]
    return None


def decode_threshold(device=None, dtype: Optional[torch.dtype] = None) -> int:
    """Largest T (tokens per call) for which the CUDA decode kernel is preferred.

    From decode_table.json for the device's architecture and the dtype (the
    "default" entry for architectures not measured, and when device/dtype are not
    given); PROPER_KERNELS_CUDA_DECODE_MAX_T overrides it."""
    env = os.environ.get("PROPER_KERNELS_CUDA_DECODE_MAX_T")
    if env:
        try:
            return max(0, min(int(env), MAX_TOKENS))
        except ValueError:
            raise ValueError(f"PROPER_KERNELS_CUDA_DECODE_MAX_T must be an int (tokens), got {env!r}") from None
    entry = _table_entry(device, dtype)
    return min(entry["max_T"], MAX_TOKENS) if entry is not None else 0


def prefers_cuda_decode(T: int, device=None, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether a dispatcher should send a batch of T tokens to this path."""
    return available() and 1 <= T <= decode_threshold(device, dtype)


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _limits(x: Tensor, weight, bias, adapters: Adapters, user_ids) -> Optional[Tuple[type, str]]:
    """(exception type, message naming the argument) for the first input the kernel
    does not take, or None. Shapes are validated already (check_mixture_args)."""
    if x.dtype not in _DTYPE_CODES:
        return TypeError, f"x must be float16, bfloat16 or float32 [T, d_in], got dtype {x.dtype}"
    if x.dim() != 2:
        return ValueError, f"x must be 2-D [T, d_in] (flatten leading dims first), got shape {_fmt(x)}"
    T, d_in = x.shape
    if not 1 <= T <= MAX_TOKENS:
        return ValueError, f"x must have T in [1, {MAX_TOKENS}] tokens (shape [T, d_in]), got T = {T}"
    if d_in < 1:
        return ValueError, f"x must have d_in >= 1 (shape [T, d_in]), got shape {_fmt(x)}"
    named = dict(zip(("weight", "bias") + ADAPTER_TENSORS, (weight, bias) + adapters.tensors()))
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            return TypeError, f"{name} {_SHAPES[name]} must have x's dtype {x.dtype}, got {t.dtype}"
        if t is not None and not t.is_contiguous():
            return ValueError, f"{name} {_SHAPES[name]} must be contiguous (call .contiguous())"
    if not x.is_contiguous():
        return ValueError, "x [T, d_in] must be contiguous (call .contiguous())"
    if user_ids is not None and user_ids.dtype not in (torch.int32, torch.int64):
        return TypeError, f"user_ids must be int32 or int64 [T], got dtype {user_ids.dtype}"
    K, r, r_u = adapters.num_experts, adapters.expert_rank, adapters.user_rank
    if K > MAX_EXPERTS:
        return ValueError, f"expert_A [K, r, d_in]: the CUDA decode kernel supports K <= {MAX_EXPERTS}, got K = {K}"
    rank_total = K * r + r_u + (K if adapters.router_weight is not None else 0)
    if rank_total > MAX_RANK_TOTAL:
        return ValueError, (f"K*r + r_u + K(router) = {rank_total} exceeds the CUDA decode kernel's limit of "
                            f"{MAX_RANK_TOTAL} (expert_A {_fmt(adapters.expert_A) if adapters.expert_A is not None else None}, "
                            f"user_A {_fmt(adapters.user_A) if adapters.user_A is not None else None})")
    return None


def unsupported_reason(x: Tensor, weight, bias, adapters: Adapters, user_ids=None) -> Optional[str]:
    """Why the decode kernel cannot take these (already validated) arguments, or None.

    No host sync: the dispatch (``proper_kernels.ops.dispatch.choose_path``) asks this
    before choosing the kernel under ``auto``.
    """
    why = _limits(x, weight, bias, adapters, user_ids)
    return None if why is None else why[1]


def check_decode_args(x, weight, bias, adapters: Adapters, *, user_ids=None, out=None,
                      require_cuda: bool = True, plan=None):
    """Validate every argument of :func:`lora_mixture_decode_cuda` (no CUDA call).

    Shapes, ranks and the user-id range go through the shared
    :func:`proper_kernels.ops.validate.check_mixture_args`; on top of it the decode
    path requires what :func:`unsupported_reason` lists (x 2-D [T, d_in] with T in
    [1, MAX_TOKENS]; float16, bfloat16 or float32, the same for every floating
    tensor; every tensor contiguous; K <= MAX_EXPERTS, K*r + r_u (+ K with a router)
    <= MAX_RANK_TOTAL), all on one CUDA device (``require_cuda=False`` lets tests run
    the checks on CPU), and ``out`` [T, d_out] of x's dtype, not overlapping any input.
    Returns the MixtureSpec. Raises TypeError / ValueError naming the argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, d_in], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d_in] (flatten leading dims first), got shape {_fmt(x)}")
    if adapters.top_k is not None and (isinstance(adapters.top_k, bool) or not isinstance(adapters.top_k, int)):
        raise TypeError(f"top_k must be an int in [1, K] or None, got {type(adapters.top_k).__name__}")
    if x.dtype in _DTYPE_CODES and 1 <= x.shape[0] <= MAX_TOKENS:
        spec = check_mixture_args(x, weight, bias, adapters, user_ids, plan)
    why = _limits(x, weight, bias, adapters, user_ids)
    if why is not None:
        raise why[0](why[1])
    if require_cuda and x.device.type != "cuda":
        # check_mixture_args already required every tensor to be on x's device.
        raise ValueError(f"x must be a CUDA tensor for the CUDA decode kernel, got device {x.device}")
    T = x.shape[0]
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor [T, d_out] = [{T}, {spec.d_out}], got {type(out).__name__}")
        if tuple(out.shape) != (T, spec.d_out):
            raise ValueError(f"out must have shape [T, d_out] = [{T}, {spec.d_out}], got {_fmt(out)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out [T, d_out] must have x's dtype {x.dtype}, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but x is on {x.device}")
        if not out.is_contiguous():
            raise ValueError("out [T, d_out] must be contiguous")
        plan_ids = plan.user_ids if plan is not None else None
        named = dict(zip(("weight", "bias") + ADAPTER_TENSORS, (weight, bias) + adapters.tensors()))
        for name, t in dict(named, x=x, user_ids=user_ids, plan_user_ids=plan_ids).items():
            if t is not None and _overlaps(out, t):
                raise ValueError(f"out must not overlap {name} (the kernel reads it while writing out)")
    return spec


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def launch_mode(launch: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None) -> str:
    """The launch mode a call uses: ``launch`` if given, else
    $PROPER_KERNELS_CUDA_DECODE_LAUNCH, else the decode table's choice for the
    device's architecture and the dtype, else "two". Raises ValueError naming the
    source of a bad value."""
    source = "launch"
    if launch is None:
        launch, source = os.environ.get("PROPER_KERNELS_CUDA_DECODE_LAUNCH"), "PROPER_KERNELS_CUDA_DECODE_LAUNCH"
        if not launch:
            entry = _table_entry(device, dtype)
            launch, source = (entry or {}).get("launch", "two"), _TABLE_PATH
    if launch not in _LAUNCH_CODES:
        raise ValueError(f"{source} must be 'two' or 'one', got {launch!r}")
    return launch


def lora_mixture_decode_cuda(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, adapters: Adapters = Adapters(), *,
    user_ids: Optional[Tensor] = None, out: Optional[Tensor] = None, return_gates: bool = False, plan=None,
    launch: Optional[str] = None, accumulate: bool = False, _ext=None,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor]]]:
    """The layer's forward (the math of ``proper_kernels.reference.mixture``) as the CUDA
    decode kernel: the base through cuBLAS, the adapter delta added by the kernel.

    Args (all floating tensors share x's dtype: float16, bfloat16 or float32; all
    contiguous, on x's CUDA device; every optional part may be None):
        x: [T, d_in], 1 <= T <= MAX_TOKENS.
        weight: W0 [d_out, d_in] or None; bias: b [d_out] or None.
        adapters: the layer's :class:`~proper_kernels.reference.adapters.Adapters`
            (without any router input the gates are uniform; top_k ties: the lower
            expert index wins).
        user_ids: int32/int64 [T], values in [-1, N); -1 = no user.
        out: optional preallocated y [T, d_out] (x's dtype); it is overwritten, unless
            ``accumulate``.
        accumulate: add the result into ``out`` (required) instead of overwriting it:
            out += x W0^T + b + delta (each part that is given). With weight=None and
            bias=None this is the add-into-y variant for a base GEMM done elsewhere.
        return_gates: also return the gates.
        plan: the batch's RoutingPlan; its ids were range-checked when it was built,
            so passing it skips the per-call host sync of that check. Its ids are the
            ones used (user_ids may then be omitted; when both are given the plan
            wins, as in :func:`proper_kernels.lora_mixture`). They are not checked
            again (e.g. ids copied into a captured plan before a CUDA-graph replay):
            a token whose id lies outside [0, N) gets no user terms; the kernel never
            reads outside the user bank.
        launch: "two" (shrink and expand kernels; the expand with programmatic
            dependent launch on sm_90) or "one" (a single cooperative kernel with a
            grid barrier between the phases); None: $PROPER_KERNELS_CUDA_DECODE_LAUNCH,
            else the decode table's choice for this GPU and dtype, else "two". Same
            result either way.
        _ext: the extension module to call instead of proper_kernels._C (see
            :func:`run_extension`).

    Returns:
        y [T, d_out] in x.dtype; with return_gates, (y, gates [T, K] float32 or None
        when there are no experts).

    Mutates only ``out`` (when given). Forward only: raises ValueError when autograd
    would need a graph (call under torch.no_grad() / inference_mode()). Validating
    user_ids costs one host sync, unless ``plan`` is given. Accumulation is fp32; the base GEMM runs in x's
    dtype through torch, the adapter delta is added to it in fp32 and rounded once.
    """
    ext = _ext if _ext is not None else (_ext_override if _ext_override is not None else _load())
    if ext is None:
        raise RuntimeError("lora_mixture_decode_cuda: " + unavailable_reason())
    if not isinstance(adapters, Adapters):
        raise TypeError(f"adapters must be a proper_kernels.Adapters, got {type(adapters).__name__}")
    launch = launch_mode(launch, getattr(x, "device", None), getattr(x, "dtype", None))
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into out: pass out [T, d_out]")
    emulated = bool(getattr(ext, "EMULATED", False))
    if emulated and isinstance(x, Tensor) and x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor for the emulated extension, got device {x.device}")
    spec = check_decode_args(x, weight, bias, adapters, user_ids=user_ids, out=out, require_cuda=not emulated,
                             plan=plan)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias) + adapters.tensors()):
        raise ValueError("lora_mixture_decode_cuda is forward-only: an input requires grad; "
                         "call it under torch.no_grad() or use proper_kernels.lora_mixture")
    if plan is not None:
        user_ids = plan.user_ids  # int32 [T], range-checked when the plan was built
    if out is None and not accumulate:
        y, gates = decode_checked(x, weight, bias, adapters, spec, user_ids, launch=launch,
                                  return_gates=return_gates, _ext=_ext)
    else:
        adapters, ids = _kernel_users(adapters, spec, user_ids)
        y, gates = _launch(ext, x, weight, bias, adapters, ids, _top_k(adapters), spec.d_out, launch, return_gates,
                           out=out, accumulate=accumulate)
        gates = gates if spec.K > 0 else None
    return (y, gates) if return_gates else y


def decode_checked(x: Tensor, weight, bias, adapters: Adapters, spec, user_ids: Optional[Tensor], *,
                   launch: Optional[str] = None, return_gates: bool = False, _ext=None):
    """(y, gates or None) of the decode kernel through its custom op (which
    torch.compile traces), on arguments already validated: shapes and the id range by
    ``check_mixture_args`` (``spec`` is its result), the kernel's limits by
    :func:`unsupported_reason` (``lora_mixture``'s dispatch asks both before it comes
    here; :func:`lora_mixture_decode_cuda` checks them itself)."""
    launch = launch_mode(launch, x.device, x.dtype)
    adapters, ids = _kernel_users(adapters, spec, user_ids)
    with (use_extension(_ext) if _ext is not None else contextlib.nullcontext()):
        y, gates = mixture_decode_op(x, weight, bias, *adapters.tensors(), ids, float(adapters.expert_scale),
                                     float(adapters.user_scale), _top_k(adapters), spec.d_out, launch, return_gates)
    return y, (gates if spec.K > 0 else None)


def _kernel_users(adapters: Adapters, spec, user_ids: Optional[Tensor]):
    """(adapters, int32 ids or None) as the kernel takes them: with no user tensors, or a
    bank of zero users (every id is -1), every user term is zero, so the kernel gets none
    of them (it needs N >= 1 for any)."""
    if not spec.N:
        return adapters._replace(user_logit_bias=None, user_A=None, user_B=None, user_router=None), None
    return adapters, (user_ids.to(dtype=torch.int32).contiguous() if user_ids is not None else None)


def _top_k(adapters: Adapters) -> int:
    return int(adapters.top_k) if adapters.top_k is not None else 0


# The extension the custom op calls when set: an emulated build of csrc/ (tests),
# else proper_kernels._C.
_ext_override = None


@contextlib.contextmanager
def use_extension(ext):
    """Within the block, the decode path (its custom op included, also inside a
    torch.compile'd function) calls the extension module ``ext`` instead of
    ``proper_kernels._C``: how the CPU emulation of csrc/ runs the public path."""
    global _ext_override
    saved, _ext_override = _ext_override, ext
    try:
        yield
    finally:
        _ext_override = saved


def _launch(ext, x: Tensor, weight, bias, adapters: Adapters, ids: Optional[Tensor], top_k: int, d_out: int,
            launch: str, return_gates: bool, *, out: Optional[Tensor] = None, accumulate: bool = False):
    """One call of the extension on checked arguments: the base through torch, the
    adapter delta added by the kernel. Returns (y, gates or None)."""
    emulated = bool(getattr(ext, "EMULATED", False))
    T, d_in = x.shape
    expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router, s_g, s_u, _ = adapters
    K, r, r_u = adapters.num_experts, adapters.expert_rank, adapters.user_rank
    N = adapters.num_users or 0
    device = x.device
    if emulated:
        dev_index, ctx = 0, contextlib.nullcontext()
    else:
        dev_index = device.index if device.index is not None else torch.cuda.current_device()
        ctx = torch.cuda.device(device)

    with ctx:
        # Base part through cuBLAS, in x's dtype; the kernel then adds into it.
        y = out if out is not None else torch.empty(T, d_out, dtype=x.dtype, device=device)
        y_in = y.data_ptr() if accumulate else 0
        if weight is not None:
            if accumulate:
                y.addmm_(x, weight.t())
                if bias is not None:
                    y.add_(bias)
            elif bias is not None:
                torch.addmm(bias, x, weight.t(), out=y)
            else:
                torch.mm(x, weight.t(), out=y)
            y_in = y.data_ptr()
        elif bias is not None:
            if accumulate:
                y.add_(bias)
            else:
                y.copy_(bias.expand(T, d_out))
            y_in = y.data_ptr()
        # else: the kernel writes delta alone (y_in = 0), or adds it into out (accumulate).

        gates = torch.empty(T, K, dtype=torch.float32, device=device) if (return_gates and K > 0) else None
        has_router = router_weight is not None
        ws_bytes = ext.workspace_bytes(dev_index, T, d_in, K, r, r_u, has_router)
        ws_numel = max(1, (ws_bytes + 3) // 4)
        if emulated:
            ws = torch.full((ws_numel,), float("nan"), dtype=torch.float32)
            stream = 0
        else:
            ws = torch.empty(ws_numel, dtype=torch.float32, device=device)
            stream = torch.cuda.current_stream(device).cuda_stream

        ext.lora_mixture_decode(
            dtype=_DTYPE_CODES[x.dtype], device=dev_index, stream=stream,
            T=T, d_in=d_in, d_out=d_out, K=K, r=r, top_k=(top_k if top_k > 0 else K),
            N=N, r_u=r_u, x=x.data_ptr(), y_in=y_in, y_out=y.data_ptr(),
            expert_A=_ptr(expert_A), expert_B=_ptr(expert_B), expert_scale=float(s_g),
            router_weight=_ptr(router_weight), user_logit_bias=_ptr(user_logit_bias),
            user_ids=_ptr(ids if N > 0 else None), user_A=_ptr(user_A), user_B=_ptr(user_B),
            user_scale=float(s_u), user_router=_ptr(user_router),
            gates=_ptr(gates), workspace=ws.data_ptr(), workspace_bytes=ws_bytes,
            launch=_LAUNCH_CODES[launch],
        )
    return y, gates


@torch.library.custom_op("proper_kernels::mixture_decode", mutates_args=())
def mixture_decode_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    # the adapter tensors, in ADAPTER_TENSORS order
    expert_A: Optional[Tensor], expert_B: Optional[Tensor], router_weight: Optional[Tensor],
    user_logit_bias: Optional[Tensor], user_A: Optional[Tensor], user_B: Optional[Tensor],
    user_router: Optional[Tensor], user_ids: Optional[Tensor],
    expert_scale: float, user_scale: float, top_k: int, d_out: int, launch: str,
    return_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """The decode forward on checked arguments (see :func:`lora_mixture_decode_cuda`):
    (y [T, d_out] x.dtype, gates [T, K] float32; [T, 0] without experts or gates)."""
    ext = _ext_override if _ext_override is not None else _load()
    adapters = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                        expert_scale, user_scale)
    y, gates = _launch(ext, x, weight, bias, adapters, user_ids, top_k, d_out, launch, return_gates)
    return y, (gates if gates is not None else x.new_empty(x.shape[0], 0, dtype=torch.float32))


@mixture_decode_op.register_fake
def _(x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
      user_ids, expert_scale, user_scale, top_k, d_out, launch, return_gates):
    K = expert_A.shape[0] if (expert_A is not None and return_gates) else 0
    return x.new_empty(x.shape[0], d_out), x.new_empty(x.shape[0], K, dtype=torch.float32)


def run_extension(ext, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None,
                  adapters: Adapters = Adapters(), **kwargs):
    """:func:`lora_mixture_decode_cuda` through a given extension module ``ext``.

    ``ext`` is either the built ``proper_kernels._C`` (CUDA tensors) or the CPU
    emulation build of the same csrc/ source (``python python/build_cuda.py
    --emulate``; it has ``EMULATED = True``), which takes CPU tensors. The emulation is
    how CI executes the CUDA kernel without a GPU; under it the scratch workspace is
    filled with NaN so that a read of a partial sum nobody wrote shows in the output.
    Same keyword arguments, checks and result as :func:`lora_mixture_decode_cuda`.
    """
    return lora_mixture_decode_cuda(x, weight, bias, adapters, _ext=ext, **kwargs)
