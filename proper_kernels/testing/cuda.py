"""Helpers of the CUDA decode kernel tests.

For tests/test_cuda_*.py: the build helper python/build_cuda.py and the CPU emulation
of csrc/ it builds, a random decode case in the keyword form of
``proper_kernels.lora_mixture``, the per-token oracle, and call_decode, the one
function through which the tests call proper_kernels.ops.cuda_decode and the
reference (it maps the keyword form onto the internal API's Adapters).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .tolerance import assert_close

__all__ = ["repo_root", "load_build_cuda", "load_emulator", "emulator_or_skip", "make_decode_case",
           "decode_loop_ref", "decode_batched_ref", "call_decode", "DecodeRunner", "assert_decode_close"]


def repo_root() -> str:
    """The checkout this package is imported from (an editable install)."""
    import os

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_build_cuda_module = None
_emulators: Dict[tuple, object] = {}


def load_build_cuda():
    """python/build_cuda.py of :func:`repo_root`, imported once per process (it is a
    script beside the package, never installed)."""
    global _build_cuda_module
    if _build_cuda_module is None:
        import importlib.util
        import os

        path = os.path.join(repo_root(), "python", "build_cuda.py")
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: the CUDA build helper needs a checkout (pip install -e .)")
        spec = importlib.util.spec_from_file_location("build_cuda", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _build_cuda_module = mod
    return _build_cuda_module


def load_emulator(defines: tuple = ()):
    """The CPU emulation module ``_C_emu`` of csrc/, imported once per process and set
    of ``defines``; the build itself is cached on disk by a hash of the sources and the
    flags (build/emu/), so only a changed tree or a fresh clone compiles (tens of
    seconds). Raises RuntimeError when it cannot be built."""
    key = tuple(defines)
    if key not in _emulators:
        _emulators[key] = load_build_cuda().load_emulator(repo_root(), defines=key)
    return _emulators[key]


def emulator_or_skip():
    """:func:`load_emulator` for a test fixture: a build failure skips the test, and
    fails it where $CI is set (CI must execute the CUDA kernel in emulation)."""
    import os

    import pytest

    try:
        return load_emulator()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must execute the CUDA kernel in emulation, but the build failed: {exc}")
        pytest.skip(f"cannot build the CPU emulation: {exc}")


def make_decode_case(T=7, d_in=96, d_out=80, K=4, r=8, N=5, r_u=8, dtype=torch.float32, device="cpu",
                     users="distinct", router=True, user_bias=True, user_lora=True, user_router=True,
                     weight=True, bias=True, experts=True, top_k=None, seed=0):
    """(x [T, d_in], W0 [d_out, d_in] or None, b [d_out] or None, kw): a random decode
    case, kw the adapter keywords of ``proper_kernels.lora_mixture`` (tensors, scales
    0.5 / 2.0, top_k, user_ids int64 [T]). ``users``: "distinct" (t mod N),
    "identical" (one user), "with_none" (-1, 0, ..., N-1, -1, ...) or "all_none"."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    kw = {}
    x = rnd(T, d_in)
    W = rnd(d_out, d_in, scale=d_in ** -0.5) if weight else None
    b = rnd(d_out, scale=0.1) if bias else None
    if experts:
        kw.update(expert_A=rnd(K, r, d_in, scale=d_in ** -0.5), expert_B=rnd(K, d_out, r, scale=r ** -0.5),
                  expert_scale=0.5, top_k=top_k)
        if router:
            kw["router_weight"] = rnd(K, d_in, scale=d_in ** -0.5)
    has_users = user_lora or (experts and (user_bias or user_router))
    if has_users:
        if users == "distinct":
            ids = torch.arange(T) % N
        elif users == "identical":
            ids = torch.full((T,), 2 % N)
        elif users == "with_none":
            ids = torch.arange(T) % (N + 1) - 1  # -1, 0, 1, ..., N-1, -1, ...
        elif users == "all_none":
            ids = torch.full((T,), -1)
        else:
            raise ValueError(f"users must be distinct, identical, with_none or all_none, got {users!r}")
        kw["user_ids"] = ids.to(device)
        if experts and user_bias:
            kw["user_logit_bias"] = rnd(N, K)
        if user_lora:
            kw.update(user_A=rnd(N, r_u, d_in, scale=d_in ** -0.5), user_B=rnd(N, d_out, r_u, scale=r_u ** -0.5),
                      user_scale=2.0)
            if experts and user_router:
                kw["user_router"] = rnd(N, K, r_u)
    return x, W, b, kw


def _decode_d_out(weight, bias, expert_B, user_B) -> int:
    for t, dim in ((weight, 0), (bias, 0), (expert_B, 1), (user_B, 1)):
        if t is not None:
            return t.shape[dim]
    raise ValueError("no tensor gives d_out")


def decode_loop_ref(x, weight, bias, *, expert_A=None, expert_B=None, expert_scale=1.0,
                    router_weight=None, user_ids=None, user_logit_bias=None, user_A=None,
                    user_B=None, user_scale=1.0, user_router=None, top_k=None, dtype=torch.float32):
    """(y, gates or None): the formula of DESIGN.md section 1 token by token, every
    tensor cast to `dtype` and every op done in `dtype`: with float32 it is the oracle
    of the decode tests; with x's dtype it is "the same computation in torch"."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router = (
        c(t) for t in (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    T, d_out = x.shape[0], _decode_d_out(weight, bias, expert_B, user_B)
    K = expert_A.shape[0] if expert_A is not None else 0
    ys, gs = [], []
    for t in range(T):
        xt = x[t]
        u = int(user_ids[t]) if user_ids is not None else -1
        y = torch.zeros(d_out, dtype=dtype, device=x.device)
        if weight is not None:
            y = y + weight @ xt
        if bias is not None:
            y = y + bias
        z = None
        if u >= 0 and user_A is not None:
            z = user_A[u] @ xt
        if K:
            logit = torch.zeros(K, dtype=torch.float32, device=x.device)
            if router_weight is not None:
                logit = logit + (router_weight @ xt).float()
            if u >= 0 and user_logit_bias is not None:
                logit = logit + user_logit_bias[u].float()
            if u >= 0 and user_router is not None:
                logit = logit + (user_router[u] @ z).float()
            kk = K if top_k is None else top_k
            keep = torch.zeros(K, dtype=torch.bool, device=x.device)
            keep[logit.topk(kk).indices] = True
            g = torch.softmax(logit.masked_fill(~keep, float("-inf")), dim=0)
            gs.append(g)
            for k in range(K):
                y = y + expert_scale * g[k].to(dtype) * (expert_B[k] @ (expert_A[k] @ xt))
        if z is not None:
            y = y + user_scale * (user_B[u] @ z)
        ys.append(y)
    gates = torch.stack(gs) if K else None
    return torch.stack(ys), gates


def decode_batched_ref(x, weight, bias, *, expert_A=None, expert_B=None, expert_scale=1.0,
                       router_weight=None, user_ids=None, user_logit_bias=None, user_A=None,
                       user_B=None, user_scale=1.0, user_router=None, top_k=None, dtype=torch.float32):
    """decode_loop_ref's formula for the whole batch at once, in `dtype` the way torch
    on a GPU computes it: every tensor rounded to `dtype`, every product accumulated in
    fp32 (as cuBLAS does) and rounded to `dtype`, sums in `dtype`. The baseline of the
    low-precision tolerance (CPU half-precision matmuls are too slow for it)."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731

    def mm(eq, *ops):
        return torch.einsum(eq, *(o.float() for o in ops)).to(dtype)

    x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router = (
        c(t) for t in (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    T, d_out = x.shape[0], _decode_d_out(weight, bias, expert_B, user_B)
    ids = user_ids.long() if user_ids is not None else torch.full((T,), -1, dtype=torch.long)
    has = (ids >= 0).to(dtype)[:, None]
    idc = ids.clamp(min=0)
    y = torch.zeros(T, d_out, dtype=dtype)
    if weight is not None:
        y = y + mm("td,od->to", x, weight)
    if bias is not None:
        y = y + bias
    z = None
    if user_A is not None:
        z = mm("td,trd->tr", x, user_A[idc]) * has
    K = expert_A.shape[0] if expert_A is not None else 0
    if K:
        logit = torch.zeros(T, K)
        if router_weight is not None:
            logit = logit + mm("td,kd->tk", x, router_weight).float()
        if user_logit_bias is not None:
            logit = logit + (user_logit_bias[idc] * has).float()
        if user_router is not None and z is not None:
            logit = logit + mm("tkr,tr->tk", user_router[idc], z).float()
        keep = torch.zeros(T, K, dtype=torch.bool)
        keep.scatter_(1, logit.topk(K if top_k is None else top_k, dim=1).indices, True)
        g = torch.softmax(logit.masked_fill(~keep, float("-inf")), dim=1).to(dtype)
        for k in range(K):
            y = y + expert_scale * g[:, k:k + 1] * mm("tr,or->to", mm("td,rd->tr", x, expert_A[k]), expert_B[k])
    if z is not None:
        y = y + user_scale * mm("tor,tr->to", user_B[idc], z) * has
    return y


def call_decode(fn, x, weight, bias, **kw):
    """``fn(x, weight, bias, adapters, **rest)`` for keyword-form arguments ``kw`` (the
    adapter tensors, scales and top_k of ``proper_kernels.lora_mixture``, gathered
    into an Adapters, and the rest: user_ids, plan, out, launch, ...). ``fn`` is a
    function of proper_kernels.ops.cuda_decode (check_decode_args, unsupported_reason,
    lora_mixture_decode_cuda, run_extension with its module bound) or the reference
    lora_mixture_ref: the one place the tests adapt to their signatures."""
    from proper_kernels.reference.adapters import Adapters

    adapters = Adapters.from_kwargs(kw)
    rest = {k: v for k, v in kw.items() if k not in Adapters._fields}
    return fn(x, weight, bias, adapters, **rest)


class DecodeRunner:
    """Runs the decode kernel in launch mode ``launch`` ("two", "one", or None: the
    default choice) under no_grad (unless ``no_grad=False``): through the emulation
    module ``ext`` on CPU tensors, or (``ext`` None) through the built extension on the
    GPU, waiting for it. ``name`` is the test id."""

    def __init__(self, name: str, launch: Optional[str], ext=None, *, no_grad: bool = True):
        self.name, self.launch, self.ext, self.no_grad = name, launch, ext, no_grad
        self.device = "cpu" if ext is not None else "cuda"

    @classmethod
    def emulated(cls, ext, launch: str) -> "DecodeRunner":
        """On an emulated sm_90 with 132 SMs (the PDL path for "two"); the single launch
        on 4 SMs: a grid of at most 8 co-resident blocks, so that blocks loop over
        several tiles of each phase. Clears the launch log."""
        ext.configure(sms=4 if launch == "one" else 132)
        ext.launches(clear=True)
        return cls("emulated" + ("-one" if launch == "one" else ""), launch, ext)

    def __call__(self, x, weight, bias, **kw):
        import functools

        from proper_kernels.ops import cuda_decode

        fn = (cuda_decode.lora_mixture_decode_cuda if self.ext is None
              else functools.partial(cuda_decode.run_extension, self.ext))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            res = call_decode(fn, x, weight, bias, launch=self.launch, **kw)
        if self.ext is None:
            torch.cuda.synchronize()
        return res


def assert_decode_close(y, x, weight, bias, kw, name: str = ""):
    """Decode output y under the one tolerance rule (:func:`assert_close`): the exact
    oracle is decode_loop_ref in fp64; the baseline is the plain computation of x's
    precision (decode_loop_ref in fp32 for fp32 x, decode_batched_ref in x's dtype for
    fp16 / bf16, what torch on a GPU computes). Returns the fp32 oracle's gates."""
    cpu = lambda t: t.cpu() if torch.is_tensor(t) else t  # noqa: E731
    args = (cpu(x), cpu(weight), cpu(bias))
    kw = {k: cpu(v) for k, v in kw.items()}
    y_ref, _ = decode_loop_ref(*args, dtype=torch.float64, **kw)
    y_f32, g_ref = decode_loop_ref(*args, dtype=torch.float32, **kw)
    baseline = y_f32 if x.dtype == torch.float32 else decode_batched_ref(*args, dtype=x.dtype, **kw)
    assert torch.isfinite(y).all(), f"{name}: non-finite output"
    assert_close(f"{name} y", y.cpu(), y_ref, baseline)
    return g_ref
