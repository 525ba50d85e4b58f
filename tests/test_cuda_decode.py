"""Tests of the CUDA decode kernel (csrc/, proper_kernels.ops.cuda_decode).

* argument checks: on CPU, through check_decode_args (no CUDA call is ever made);
* the build: `python python/build_cuda.py --check` compiles and imports the
  extension (skipped without nvcc / pybind11);
* the kernel: against a per-token fp32 loop of DESIGN.md section 1, for
  bf16/fp16/fp32 and T in {1, 7, 64, 257}, in both launch modes (two kernels; one
  cooperative kernel), in the CPU emulation of the csrc/ source (always;
  csrc/emu/cuda_emu.h) and on a GPU (skipped without one). Low
  precision must stay within a small multiple of the error the same-dtype torch
  computation makes against the fp32 loop (STYLE.md);
* the emulation's own checks: its self-test kernels, NaN-guarded buffers for
  out-of-bounds reads and writes, and the launch plans of several devices.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from proper_kernels.ops import cuda_decode as cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build_cuda():
    spec = importlib.util.spec_from_file_location("build_cuda", os.path.join(ROOT, "python", "build_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- reference: per-token loop, exactly the formula ---------------------------------


def _d_out(weight, bias, expert_B, user_B) -> int:
    for t, dim in ((weight, 0), (bias, 0), (expert_B, 1), (user_B, 1)):
        if t is not None:
            return t.shape[dim]
    raise ValueError("no tensor gives d_out")


def decode_loop_ref(x, weight, bias, *, expert_A=None, expert_B=None, expert_scale=1.0,
                    router_weight=None, user_ids=None, user_logit_bias=None, user_A=None,
                    user_B=None, user_scale=1.0, user_router=None, top_k=None, dtype=torch.float32):
    """Every tensor cast to `dtype` and every op done in `dtype`: with float32 it is
    the oracle; with x's dtype it is "the same computation in torch" of STYLE.md."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router = (
        c(t) for t in (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    T, d_out = x.shape[0], _d_out(weight, bias, expert_B, user_B)
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
    T, d_out = x.shape[0], _d_out(weight, bias, expert_B, user_B)
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


def make_case(T=7, d_in=96, d_out=80, K=4, r=8, N=5, r_u=8, dtype=torch.float32, device="cpu",
              users="distinct", router=True, user_bias=True, user_lora=True, user_router=True,
              weight=True, bias=True, experts=True, top_k=None, seed=0):
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
            raise ValueError(users)
        kw["user_ids"] = ids.to(device)
        if experts and user_bias:
            kw["user_logit_bias"] = rnd(N, K)
        if user_lora:
            kw.update(user_A=rnd(N, r_u, d_in, scale=d_in ** -0.5), user_B=rnd(N, d_out, r_u, scale=r_u ** -0.5),
                      user_scale=2.0)
            if experts and user_router:
                kw["user_router"] = rnd(N, K, r_u)
    return x, W, b, kw


# ---- argument checks (CPU) -----------------------------------------------------------


def _check(x, W, b, **kw):
    return cd.check_decode_args(x, W, b, require_cuda=False, **kw)


def test_check_accepts_valid_case():
    x, W, b, kw = make_case(dtype=torch.bfloat16, top_k=2)
    spec = _check(x, W, b, **kw)
    assert (spec.T, spec.d_in, spec.d_out, spec.K, spec.r, spec.N, spec.r_u) == (7, 96, 80, 4, 8, 5, 8)


@pytest.mark.parametrize("name,mutate,exc,match", [
    ("x 3-D", lambda x, W, b, kw: (x.view(1, 7, 96), W, b, kw), ValueError, "x must be 2-D"),
    ("x float64", lambda x, W, b, kw: (x.double(), W, b, kw), TypeError, "x must be float16"),
    ("x int", lambda x, W, b, kw: (x.long(), W, b, kw), TypeError, "x must be float16"),
    ("x not tensor", lambda x, W, b, kw: (x.tolist(), W, b, kw), TypeError, "x must be a torch.Tensor"),
    ("x non-contiguous", lambda x, W, b, kw: (torch.empty(96, 7, dtype=x.dtype).t(), W, b, kw), ValueError, "x .* contiguous"),
    ("T too large", lambda x, W, b, kw: (torch.zeros(cd.MAX_TOKENS + 1, 96, dtype=x.dtype), W, b,
                                         dict(kw, user_ids=torch.zeros(cd.MAX_TOKENS + 1, dtype=torch.long))), ValueError, "T in"),
    ("weight dtype", lambda x, W, b, kw: (x, W.half(), b, kw), TypeError, "weight .*dtype"),
    ("weight shape", lambda x, W, b, kw: (x, W[:, :50], b, kw), ValueError, "weight"),
    ("weight non-contiguous", lambda x, W, b, kw: (x, W.t().contiguous().t(), b, kw), ValueError, "weight .*contiguous"),
    ("bias shape", lambda x, W, b, kw: (x, W, b[:3], kw), ValueError, "bias"),
    ("expert_A dtype", lambda x, W, b, kw: (x, W, b, dict(kw, expert_A=kw["expert_A"].float())), TypeError, "expert_A"),
    ("expert_B shape", lambda x, W, b, kw: (x, W, b, dict(kw, expert_B=kw["expert_B"][:, :, :4])), ValueError, "expert_B"),
    ("expert_A alone", lambda x, W, b, kw: (x, W, b, dict(kw, expert_B=None)), ValueError, "expert_A"),
    ("router shape", lambda x, W, b, kw: (x, W, b, dict(kw, router_weight=kw["router_weight"][:3])), ValueError, "router_weight"),
    ("router dtype", lambda x, W, b, kw: (x, W, b, dict(kw, router_weight=kw["router_weight"].half())), TypeError, "router_weight"),
    ("user_logit_bias shape", lambda x, W, b, kw: (x, W, b, dict(kw, user_logit_bias=kw["user_logit_bias"][:, :2])), ValueError, "user_logit_bias"),
    ("user_A N mismatch", lambda x, W, b, kw: (x, W, b, dict(kw, user_A=kw["user_A"][:3])), ValueError, "user_A"),
    ("user_B shape", lambda x, W, b, kw: (x, W, b, dict(kw, user_B=kw["user_B"][:, :10])), ValueError, "user_B"),
    ("user_B non-contiguous", lambda x, W, b, kw: (x, W, b, dict(kw, user_B=kw["user_B"].transpose(1, 2).contiguous().transpose(1, 2))), ValueError, "user_B .*contiguous"),
    ("user_router shape", lambda x, W, b, kw: (x, W, b, dict(kw, user_router=kw["user_router"][:, :, :4])), ValueError, "user_router"),
    ("user_router without user_A", lambda x, W, b, kw: (x, W, b, dict(kw, user_A=None, user_B=None)), ValueError, "user_router"),
    ("user_ids missing", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=None)), ValueError, "user_ids"),
    ("user_ids float", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=kw["user_ids"].float())), TypeError, "user_ids"),
    ("user_ids int16", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=kw["user_ids"].short())), TypeError, "user_ids"),
    ("user_ids shape", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=kw["user_ids"][:3])), ValueError, "user_ids"),
    ("user_ids too large", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=kw["user_ids"] + 5)), ValueError, "user_ids must lie in"),
    ("user_ids below -1", lambda x, W, b, kw: (x, W, b, dict(kw, user_ids=kw["user_ids"] - 3)), ValueError, "user_ids must lie in"),
    ("top_k zero", lambda x, W, b, kw: (x, W, b, dict(kw, top_k=0)), ValueError, "top_k"),
    ("top_k > K", lambda x, W, b, kw: (x, W, b, dict(kw, top_k=5)), ValueError, "top_k"),
    ("top_k float", lambda x, W, b, kw: (x, W, b, dict(kw, top_k=2.0)), TypeError, "top_k"),
    ("scale tensor", lambda x, W, b, kw: (x, W, b, dict(kw, expert_scale=torch.tensor(1.0))), TypeError, "expert_scale"),
    ("user_scale str", lambda x, W, b, kw: (x, W, b, dict(kw, user_scale="2")), TypeError, "user_scale"),
    ("router without experts", lambda x, W, b, kw: (x, W, b, dict(kw, expert_A=None, expert_B=None, top_k=None, user_router=None, user_logit_bias=None)), ValueError, "router_weight"),
    ("out shape", lambda x, W, b, kw: (x, W, b, dict(kw, out=torch.empty(7, 81, dtype=x.dtype))), ValueError, "out must have shape"),
    ("out dtype", lambda x, W, b, kw: (x, W, b, dict(kw, out=torch.empty(7, 80))), TypeError, "out"),
    ("out aliases x", lambda x, W, b, kw: (x, W, b, dict(kw, out=x.view(-1)[: 7 * 80].view(7, 80))), ValueError, "overlap x"),
])
def test_check_rejects(name, mutate, exc, match):
    x, W, b, kw = make_case(dtype=torch.bfloat16, top_k=2)
    x, W, b, kw = mutate(x, W, b, kw)
    with pytest.raises(exc, match=match):
        _check(x, W, b, **kw)


def test_check_limits():
    x, W, b, kw = make_case(dtype=torch.float16, K=65, r=1, user_lora=False, user_bias=False, router=False)
    with pytest.raises(ValueError, match="K <= 64"):
        _check(x, W, b, **kw)
    x, W, b, kw = make_case(dtype=torch.float16, K=16, r=64, r_u=8)
    with pytest.raises(ValueError, match="exceeds"):
        _check(x, W, b, **kw)


def test_check_requires_cuda_tensors():
    x, W, b, kw = make_case(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cd.check_decode_args(x, W, b, require_cuda=True, **kw)


@pytest.mark.skipif(cd.available(), reason="the extension is built here")
def test_call_without_extension_raises_runtime_error():
    x, W, b, kw = make_case(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not built"):
        cd.lora_mixture_decode_cuda(x, W, b, **kw)
    assert cd.built_archs() == []
    assert isinstance(cd.unavailable_reason(), str)


def test_threshold():
    # Unmeasured architectures: auto never picks the kernel (it has not run there).
    assert cd.decode_threshold() == 0 and not cd._table_entry(None, None)["measured"]
    assert not cd.prefers_cuda_decode(1)
    os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"] = "40"
    try:
        assert cd.decode_threshold() == 40
        os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"] = "sixteen"
        with pytest.raises(ValueError, match="PROPER_KERNELS_CUDA_DECODE_MAX_T must be an int"):
            cd.decode_threshold()
        from proper_kernels.env import report
        assert report()["cuda_decode_dispatch"].startswith("error: PROPER_KERNELS_CUDA_DECODE_MAX_T")
    finally:
        del os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"]
    os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"] = "16"
    try:
        assert cd.prefers_cuda_decode(1) == cd.available()
        assert not cd.prefers_cuda_decode(17)
    finally:
        del os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"]


@pytest.mark.parametrize("kw_case", [dict(), dict(users="with_none", top_k=2), dict(experts=False), dict(user_lora=False)])
def test_loop_ref_matches_package_reference(kw_case):
    """The test's own loop agrees with proper_kernels.reference (CPU, fp32)."""
    from proper_kernels.reference import lora_mixture_ref

    x, W, b, kw = make_case(**kw_case)
    y_loop, g_loop = decode_loop_ref(x, W, b, **kw)
    y_ref, g_ref = lora_mixture_ref(x, W, b, **kw)
    torch.testing.assert_close(y_loop, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_batched_ref(x, W, b, **kw), y_ref, rtol=1e-5, atol=1e-5)
    if g_ref is not None:
        torch.testing.assert_close(g_loop, g_ref, rtol=1e-5, atol=1e-6)


# ---- the build -----------------------------------------------------------------------


def test_build_check_compiles():
    bc = _load_build_cuda()
    _, nvcc = bc.find_cuda_home()
    if nvcc is None:
        pytest.skip("nvcc not found")
    pytest.importorskip("pybind11")
    env = dict(os.environ)
    env.pop("PROPER_KERNELS_SKIP_CUDA_BUILD", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", "build_cuda.py"), "--check"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "CHECK OK" in proc.stdout, proc.stdout + proc.stderr
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout


def test_ptxas_registers_and_spills():
    """Register budget of the CUDA kernels on sm_90 (nvcc -Xptxas -v, no GPU): every
    instance (3 kernels x 3 dtypes x 3 vector widths) fits the 128 registers of two
    blocks per SM (__launch_bounds__(256, 2) for shrink and the single launch) and
    spills at most 16 bytes."""
    bc = _load_build_cuda()
    if bc.find_cuda_home()[1] is None:
        pytest.skip("nvcc not found")
    rows = bc.ptxas_report(ROOT, "90")
    assert sorted({(r["kernel"], r["dtype"]) for r in rows}) == sorted(
        (k, d) for k in ("shrink", "expand", "fused") for d in ("bf16", "fp16", "fp32"))
    assert len(rows) == 27
    for r in rows:
        assert r["registers"] <= 128, r
        assert r["spill_stores"] <= 16, r


def test_build_skips_cleanly(monkeypatch, capsys):
    bc = _load_build_cuda()
    monkeypatch.setenv("PROPER_KERNELS_SKIP_CUDA_BUILD", "1")
    assert bc.cuda_extensions(ROOT) == ([], {})
    assert "PROPER_KERNELS_SKIP_CUDA_BUILD" in capsys.readouterr().err
    monkeypatch.delenv("PROPER_KERNELS_SKIP_CUDA_BUILD")
    monkeypatch.setitem(sys.modules, "pybind11", None)  # import pybind11 -> ImportError
    exts, cmdclass = bc.cuda_extensions(ROOT)
    err = capsys.readouterr().err
    assert exts == [] and cmdclass == {}
    assert "pybind11" in err or "nvcc" in err


def test_arch_list_parsing():
    bc = _load_build_cuda()
    assert bc.parse_arch_list("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert bc.parse_arch_list("sm_80, 90a") == [("80", False), ("90a", False)]
    flags = bc.nvcc_arch_flags(bc.parse_arch_list(bc.DEFAULT_ARCH_LIST))
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=[sm_90,compute_90]" in flags
    with pytest.raises(ValueError):
        bc.parse_arch_list("7.0")
    with pytest.raises(ValueError):
        bc.parse_arch_list("banana")


# ---- the kernel: on a GPU, and in the CPU emulation -----------------------------------
#
# Every kernel test runs twice: "emulated" executes the csrc/ source itself on CPU
# tensors through the emulation build (python/build_cuda.py --emulate, see
# csrc/emu/cuda_emu.h), so CI runs the kernel's indexing, barriers and shuffles on
# every change; "cuda" runs the built extension on a GPU and skips without one.

needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and cd.available()),
    reason="needs a CUDA device and the built extension proper_kernels._C",
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="session")
def emu():
    """The CPU emulation module, built once per session (cached under build/emu/)."""
    bc = _load_build_cuda()
    try:
        return bc.load_emulator(ROOT)
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must execute the CUDA kernel in emulation, but the build failed: {exc}")
        pytest.skip(f"cannot build the CPU emulation: {exc}")


class Runner:
    """Runs the decode kernel on `device` with launch mode `launch` under no_grad and
    waits for it."""

    def __init__(self, name, device, fn, launch, ext=None):
        self.name, self.device, self.fn, self.launch, self.ext = name, device, fn, launch, ext

    def __call__(self, x, W, b, **kw):
        with torch.no_grad():
            res = self.fn(x, W, b, launch=self.launch, **kw)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return res


# (where, launch mode). The emulated single launch runs on a 4-SM device: a grid of at
# most 8 co-resident blocks, so the blocks loop over several tiles of each phase.
@pytest.fixture(params=[
    pytest.param(("emulated", "two"), id="emulated"),
    pytest.param(("emulated", "one"), id="emulated-one"),
    pytest.param(("cuda", "two"), id="cuda", marks=[pytest.mark.gpu, needs_kernel]),
    pytest.param(("cuda", "one"), id="cuda-one", marks=[pytest.mark.gpu, needs_kernel]),
])
def run(request):
    where, launch = request.param
    name = where + ("-one" if launch == "one" else "")
    if where == "cuda":
        return Runner(name, "cuda", cd.lora_mixture_decode_cuda, launch)
    ext = request.getfixturevalue("emu")
    ext.configure(sms=4 if launch == "one" else 132)  # sm_90: the PDL path for "two"
    ext.launches(clear=True)
    return Runner(name, "cpu", functools.partial(cd.run_extension, ext), launch, ext)


def _assert_close_to_oracle(y, x, W, b, kw, name=""):
    y_ref, g_ref = decode_loop_ref(x, W, b, dtype=torch.float32, **kw)
    assert torch.isfinite(y).all(), f"{name}: non-finite output"
    err = (y.float() - y_ref).abs().max().item()
    scale = y_ref.abs().max().item() + 1e-6
    if x.dtype == torch.float32:
        assert err <= 1e-4 * scale + 1e-5, f"{name}: fp32 max err {err} (|y| max {scale})"
    else:
        cpu = lambda t: t.cpu() if torch.is_tensor(t) else t  # noqa: E731
        y_same = decode_batched_ref(cpu(x), cpu(W), cpu(b), dtype=x.dtype, **{k: cpu(v) for k, v in kw.items()})
        err_torch = (y_same.float() - y_ref.cpu()).abs().max().item()
        # one rounding of the output is the floor: half an ulp of the largest value
        ulp = scale * (2 ** -8 if x.dtype == torch.bfloat16 else 2 ** -11)
        assert err <= 2 * err_torch + ulp, f"{name}: err {err} vs same-dtype torch {err_torch}"
    return g_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("users", ["distinct", "identical", "with_none"])
def test_kernel_full_mixture(run, dtype, T, users):
    x, W, b, kw = make_case(T=T, d_in=256, d_out=192, K=4, r=8, N=5, r_u=8, dtype=dtype,
                            device=run.device, users=users, seed=T)
    y, gates = run(x, W, b, return_gates=True, **kw)
    assert y.dtype == dtype and y.shape == (T, 192)
    g_ref = _assert_close_to_oracle(y, x, W, b, kw, f"{dtype} T={T} {users}")
    assert gates.dtype == torch.float32 and gates.shape == (T, 4)
    torch.testing.assert_close(gates, g_ref, rtol=1e-3, atol=1e-4 if dtype == torch.float32 else 2e-3)


CONFIGS = {
    "K=1": dict(K=1),
    "top_k=2": dict(K=6, top_k=2),
    "top_k=1": dict(K=3, top_k=1),
    "no experts": dict(experts=False),
    "no users": dict(user_lora=False, user_bias=False, user_router=False),
    "uniform gates (no router input)": dict(router=False, user_bias=False, user_router=False),
    "user bias only": dict(user_lora=False, user_router=False, router=False),
    "all users -1": dict(users="all_none"),
    "no base (out-of-place)": dict(weight=False, bias=False),
    "bias only base": dict(weight=False),
    "odd sizes (scalar path)": dict(d_in=111, d_out=99, r=3, r_u=5),
    "8-byte vectors": dict(d_in=100, d_out=64, r=4, r_u=4),
    "large d, K=8 r=16": dict(d_in=2048, d_out=1024, K=8, r=16, r_u=16, N=3),
    "K=40 (two logits per lane)": dict(K=40, r=2, top_k=7, d_in=64, d_out=48),
    "at the limits: K=64, K*r+r_u+K=1024": dict(K=64, r=14, r_u=64, top_k=5, d_in=64, d_out=40),
    "nothing but base": dict(experts=False, user_lora=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernel_configs(run, dtype, T, config):
    if run.device == "cpu" and T == 257 and config.startswith("large"):
        pytest.skip("emulated: the large shape is covered at T <= 64")
    if run.name == "emulated-one" and T > 7:
        pytest.skip("emulated: the single launch runs the same tile code; its T > 7 cases are in test_kernel_full_mixture")
    x, W, b, kw = make_case(**dict(dict(T=T, d_in=128, d_out=160, dtype=dtype, device=run.device, seed=T),
                                   **CONFIGS[config]))
    y, gates = run(x, W, b, return_gates=True, **kw)
    g_ref = _assert_close_to_oracle(y, x, W, b, kw, f"{config} {dtype} T={T}")
    if g_ref is None:
        assert gates is None
    else:
        torch.testing.assert_close(gates, g_ref, rtol=1e-3, atol=2e-3)
        if kw.get("top_k"):
            assert ((gates > 0).sum(-1) == kw["top_k"]).all()


def test_kernel_out_and_int32_ids(run):
    x, W, b, kw = make_case(T=19, d_in=256, d_out=128, dtype=torch.bfloat16, device=run.device, users="with_none")
    kw["user_ids"] = kw["user_ids"].int()
    out = torch.full((19, 128), float("nan"), dtype=torch.bfloat16, device=run.device)
    y = run(x, W, b, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    _assert_close_to_oracle(y, x, W, b, kw, "out=")


@pytest.mark.parametrize("base", ["none", "weight", "bias"])
def test_kernel_accumulate(run, base):
    """accumulate=True adds into out (the add-into-y variant): out0 + the whole result."""
    x, W, b, kw = make_case(T=13, d_in=96, d_out=80, dtype=torch.float32, device=run.device, users="with_none",
                            weight=base == "weight", bias=base != "none")
    out0 = torch.randn(13, 80, generator=torch.Generator().manual_seed(1)).to(run.device)
    out = out0.clone()
    y = run(x, W, b, out=out, accumulate=True, **kw)
    assert y.data_ptr() == out.data_ptr()
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, out0 + y_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="accumulate=True adds into out"):
        run(x, W, b, accumulate=True, **kw)


def test_kernel_misaligned_views(run):
    """A view at an odd element offset forces the scalar load path."""
    x, W, b, kw = make_case(T=5, d_in=128, d_out=64, dtype=torch.float16, device=run.device)
    buf = torch.randn(5 * 128 + 1, dtype=torch.float16, device=run.device)
    x = buf[1:].view(5, 128)
    y = run(x, W, b, **kw)
    _assert_close_to_oracle(y, x, W, b, kw, "misaligned")


@needs_kernel
@pytest.mark.gpu
def test_kernel_side_stream():
    x, W, b, kw = make_case(T=19, d_in=256, d_out=128, dtype=torch.bfloat16, device="cuda", users="with_none")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        y = cd.lora_mixture_decode_cuda(x, W, b, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    _assert_close_to_oracle(y, x, W, b, kw, "side stream")


@needs_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["two", "one"])
def test_kernel_cuda_graph_capture(launch):
    """Captured into a CUDA graph (with a plan: no host sync) and replayed on new x."""
    import proper_kernels as pk

    x, W, b, kw = make_case(T=16, d_in=256, d_out=128, dtype=torch.bfloat16, device="cuda", users="with_none")
    plan = pk.plan(kw["user_ids"], 5)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            cd.lora_mixture_decode_cuda(static_x, W, b, plan=plan, launch=launch, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = cd.lora_mixture_decode_cuda(static_x, W, b, plan=plan, launch=launch, **kw)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_to_oracle(y, x2, W, b, kw, f"graph replay, launch={launch}")


@needs_kernel
@pytest.mark.gpu
def test_kernel_rejects_grad_and_cpu():
    x, W, b, kw = make_case(T=3, dtype=torch.float32, device="cuda")
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        cd.lora_mixture_decode_cuda(x, W, b, **kw)
    with pytest.raises(ValueError, match="device"):
        cd.lora_mixture_decode_cuda(x, W.detach().cpu(), b, **kw)


@needs_kernel
@pytest.mark.gpu
def test_extension_reports():
    archs = cd.built_archs()
    assert any(a.startswith("sm_") for a in archs)
    ext = cd._load()
    assert ext.MAX_TOKENS == cd.MAX_TOKENS and ext.MAX_EXPERTS == cd.MAX_EXPERTS
    assert ext.MAX_RANK_TOTAL == cd.MAX_RANK_TOTAL
    assert ext.EMULATED is False


# ---- what only the emulation can show -------------------------------------------------


def test_emulator_selftests(emu):
    """The emulator catches each bug class it claims to (csrc/emu/selftest.cpp)."""
    emu.configure()
    expect = {
        "divergent_barrier": "deadlock",
        "shuffle_after_exit": "live lanes",
        "mixed_warp_ops": "divergent barrier",
        "misaligned_load": "misaligned 16-byte",
        "smem_overflow": "wrote past",
    }
    assert set(emu.selftest_names()) == set(expect) | {"reduce_ok", "missing_barrier", "too_much_smem",
                                                       "pdl_wait_read", "pdl_early_read"}
    err, fault, out = emu.selftest("reduce_ok")
    assert (err, fault) == ("", "")
    assert out == [1520.0] * 32 + [496.0] * 32
    for name, words in expect.items():
        err, fault, _ = emu.selftest(name)
        assert err == "" and words in fault, (name, fault)
    assert emu.selftest("too_much_smem")[0] == "cudaErrorInvalidValue"
    # A read without the barrier that orders it sees the poison, from either side.
    for reverse, nan_at in ((False, 0), (True, 63)):
        emu.configure(reverse=reverse)
        _, fault, out = emu.selftest("missing_barrier")
        assert fault == "" and math.isnan(out[nan_at]), (reverse, out[:4], out[-4:])
    # PDL: a consumer launched with programmatic stream serialization that reads the
    # producer's output after griddepcontrol.wait gets it; before the wait it gets
    # the old memory (NaN), because the emulation runs the consumer up to its wait
    # before the producer. In plain stream order (pdl_early=False) the early read
    # would pass unnoticed.
    expected = [2.0 * i for i in range(64)]
    for pdl_early in (True, False):
        emu.configure(pdl_early=pdl_early)
        assert emu.selftest("pdl_wait_read") == ("", "", expected)
        err, fault, out = emu.selftest("pdl_early_read")
        assert (err, fault) == ("", "")
        assert all(map(math.isnan, out)) if pdl_early else out == expected
    emu.configure()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulator_conversions_match_torch(emu, dtype):
    """The emulator's float <-> fp16 / bf16 conversions round exactly as torch's (to
    nearest even): random values over the whole range, every boundary of fp16
    (subnormals, the smallest normal, overflow to inf) and ties, inf and nan."""
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,), generator=g).float()),
        torch.tensor([0.0, -0.0, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -25 * 1.0001, 2 ** -14, 2 ** -14 * (1 - 2 ** -11),
                      65504.0, 65519.99, 65520.0, -65520.0, 1e10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8,
                      1 + 3 * 2 ** -8, 3.0e38, float("inf"), float("-inf")]),
    ])
    # every fp16 / bf16 value and the midpoints between neighbours
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    exact = bits.view(dtype).float()
    exact = exact[torch.isfinite(exact)].unique()
    vals = torch.cat([vals, exact, (exact[1:] + exact[:-1]) / 2])
    out = torch.tensor(emu.round_trip(vals.tolist(), str(dtype).replace("torch.", "")))
    want = vals.to(dtype).float()
    assert torch.equal(out, want), (vals[out != want][:5], out[out != want][:5], want[out != want][:5])
    nan = emu.round_trip([float("nan")], str(dtype).replace("torch.", ""))[0]
    assert math.isnan(nan)


def test_emulator_portable_switch(emu):
    """The ucontext fiber switch (used off x86-64) passes the self-tests and a kernel
    case too; built and run in a subprocess, beside the x86-64 build."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.join(ROOT, 'python')!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import build_cuda
from test_cuda_decode import make_case, decode_loop_ref
from proper_kernels.ops import cuda_decode as cd
emu = build_cuda.load_emulator({ROOT!r}, defines=("PK_EMU_USE_UCONTEXT",))
assert emu.selftest("reduce_ok")[:2] == ("", ""), emu.selftest("reduce_ok")
assert "deadlock" in emu.selftest("divergent_barrier")[1]
x, W, b, kw = make_case(T=9, d_in=300, d_out=40, dtype=torch.float32, users="with_none", top_k=2)
for launch in ("two", "one"):
    with torch.no_grad():
        y = cd.run_extension(emu, x, W, b, launch=launch, **kw)
    err = (y - decode_loop_ref(x, W, b, **kw)[0]).abs().max().item()
    assert err < 1e-4, (launch, err)
print("PORTABLE OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PORTABLE OK" in proc.stdout, proc.stdout + proc.stderr


def _padded(t, offset, pad=64, fill=float("nan")):
    """A copy of t living `offset` elements into a buffer padded with `fill` on both sides."""
    buf = torch.full((offset + t.numel() + pad,), fill if t.is_floating_point() else -7, dtype=t.dtype)
    view = buf[offset: offset + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


@pytest.mark.parametrize("offset", [64, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_no_out_of_bounds(emu, offset, dtype):
    """Every input sits in a NaN-padded buffer (a read past any edge makes the output
    NaN), the output in a sentinel-padded one (a write past it shows)."""
    emu.configure()
    x, W, b, kw = make_case(T=11, d_in=72, d_out=40, K=3, r=4, N=4, r_u=4, dtype=dtype, users="with_none", top_k=2)
    keep = []
    x = _padded(x, offset)[1]
    for name in ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router"):
        buf, kw[name] = _padded(kw[name], offset)
        keep.append(buf)
    ids_buf, kw["user_ids"] = _padded(kw["user_ids"].int(), offset)
    out_buf = torch.full((offset + 11 * 40 + 64,), 123.0, dtype=dtype)
    out = out_buf[offset: offset + 11 * 40].view(11, 40)
    y, gates = cd.run_extension(emu, x, W, b, out=out, return_gates=True, **kw)
    _assert_close_to_oracle(y, x, W, b, kw, f"padded offset={offset}")
    assert (out_buf[:offset] == 123.0).all() and (out_buf[offset + 11 * 40:] == 123.0).all()
    assert torch.isfinite(gates).all()


@pytest.mark.parametrize("device", [
    dict(sms=132, cc_major=9),
    dict(sms=132, cc_major=9, reverse=True),
    dict(sms=108, cc_major=8),
    dict(sms=3, cc_major=9),
    dict(sms=1, cc_major=8, reverse=True),
    dict(sms=132, cc_major=9, fail_pdl=True),
    dict(sms=132, cc_major=9, capturing=True),
    dict(sms=132, cc_major=9, pdl_early=False),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("launch", ["two", "one"])
def test_emulated_device_variants(emu, device, launch):
    """The launch plan (d_in splits, lanes per output row, PDL or not, the single
    launch's grid) depends on the device; every plan gives the same result, and the
    launch log shows which ran. With PDL the emulation runs the expand's first blocks
    (the resident ones, at most 64) up to their griddepcontrol.wait before the shrink
    runs: a read of the workspace before the wait would see its NaN poison."""
    emu.configure(**device)
    emu.launches(clear=True)
    x, W, b, kw = make_case(T=9, d_in=1536, d_out=96, K=4, r=8, N=3, r_u=8, dtype=torch.float32,
                            users="with_none", top_k=3)
    y, gates = cd.run_extension(emu, x, W, b, return_gates=True, launch=launch, **kw)
    emu.configure()
    g_ref = _assert_close_to_oracle(y, x, W, b, kw, str(device))
    torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-5)
    log = emu.launches(clear=True)
    if launch == "one":
        # one cooperative launch: as many blocks as the larger phase has tiles (the
        # shrink: 2 row blocks x 2 token tiles x splits), at most 2 per SM
        assert [(e["kernel"], e["cooperative"], e["pdl"]) for e in log] == [("fused", True, False)]
        splits = {1: 1, 3: 2}.get(device["sms"], 6)
        assert log[0]["grid"] == (min(4 * splits, 2 * device["sms"]), 1, 1)
        return
    assert [entry["kernel"] for entry in log] == ["shrink", "expand"]
    shrink, expand = log
    assert shrink["block"] == expand["block"] == (256, 1, 1)
    assert shrink["grid"][1] == expand["grid"][1] == 2  # token tiles of 8
    # d_in = 1536 is 6 units of 256; ~2 waves of blocks: 2 row blocks x 2 token tiles
    # fill 3 SMs twice with 2 splits, 1 SM with 1; big GPUs take all 6.
    assert shrink["grid"][2] == {1: 1, 3: 2}.get(device["sms"], 6)
    pdl = device["cc_major"] >= 9 and not device.get("fail_pdl") and not device.get("capturing")
    assert expand["pdl"] is pdl
    blocks = expand["grid"][0] * expand["grid"][1]
    early = min(64, 2 * device["sms"], blocks) if pdl and device.get("pdl_early", True) else 0
    assert (shrink["early_blocks"], expand["early_blocks"]) == (0, early)


@pytest.mark.parametrize("case", [
    dict(T=1), dict(T=8), dict(T=9, users="with_none"), dict(T=64, users="identical"),
    dict(T=5, d_in=111, d_out=99, r=3, r_u=5), dict(T=3, router=False, user_router=False),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_emulated_weight_traffic(emu, case):
    """Counted in the emulation (python/emu_traffic.py): the kernel's vector loads touch
    exactly the weight bytes the formula needs (every expert/router row, the A/B rows
    of each user present, nothing else), both launch modes load the same, and a single
    token loads every weight byte exactly once."""
    kw_case = dict(dict(d_in=256, d_out=96, K=4, r=8, N=5, r_u=8, dtype=torch.bfloat16), **case)
    x, W, b, kw = make_case(**kw_case)
    traffic = {}
    for launch in ("two", "one"):
        emu.configure(sms=8)
        emu.launches(clear=True)
        cd.run_extension(emu, x, W, b, launch=launch, **kw)
        log = emu.launches(clear=True)
        traffic[launch] = {k: sum(e[k] for e in log) for k in ("weight_bytes", "weight_bytes_unique", "act_bytes_unique")}
    emu.configure()
    K, r, r_u, d_in, d_out = kw_case["K"], kw_case["r"], kw_case["r_u"], kw_case["d_in"], kw_case["d_out"]
    users = int((kw["user_ids"].unique() >= 0).sum())
    rows_in = K * r + (K if kw.get("router_weight") is not None else 0) + users * r_u
    model = 2 * (rows_in * d_in + (K * r + users * r_u) * d_out)
    assert traffic["two"] == traffic["one"]
    assert traffic["two"]["weight_bytes_unique"] == model
    assert traffic["two"]["act_bytes_unique"] == 2 * x.numel()  # every x element, once at least
    if case["T"] == 1:
        assert traffic["two"]["weight_bytes"] == model


def test_emu_traffic_cli(emu):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", "emu_traffic.py"), "--T", "1", "9",
                           "--d-in", "64", "--d-out", "32", "--K", "2", "--r", "4", "--r-u", "4", "--N", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "two"), ("1", "one"), ("9", "two"), ("9", "one")]
    for row in rows:
        assert row[3] == row[4]  # unique weight MB == the model's
    assert rows[0][6] == "1.00"  # one token: every weight byte loaded once


def test_emulated_disable_pdl_env(emu, monkeypatch):
    """PROPER_KERNELS_DISABLE_PDL=1 (read by the C++ launcher) turns PDL off on sm_90."""
    emu.configure()
    x, W, b, kw = make_case(T=5, dtype=torch.float32)
    for value, pdl in (("1", False), ("0", True)):
        monkeypatch.setenv("PROPER_KERNELS_DISABLE_PDL", value)
        emu.launches(clear=True)
        y = cd.run_extension(emu, x, W, b, **kw)
        assert [e["pdl"] for e in emu.launches(clear=True)] == [False, pdl]
        _assert_close_to_oracle(y, x, W, b, kw, f"DISABLE_PDL={value}")


def test_emulated_launch_error_is_raised(emu):
    """A launch the device refuses surfaces as RuntimeError naming the kernel."""
    emu.configure(max_dynamic_smem=64)
    try:
        x, W, b, kw = make_case(T=3, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="expand kernel launch: cudaErrorInvalidValue"):
            cd.run_extension(emu, x, W, b, **kw)
    finally:
        emu.configure()


def test_launch_mode_is_checked(emu, monkeypatch):
    x, W, b, kw = make_case(T=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="launch must be 'two' or 'one', got 'three'"):
        cd.run_extension(emu, x, W, b, launch="three", **kw)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_DECODE_LAUNCH", "1")
    with pytest.raises(ValueError, match="PROPER_KERNELS_CUDA_DECODE_LAUNCH must be 'two' or 'one', got '1'"):
        cd.run_extension(emu, x, W, b, **kw)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_DECODE_LAUNCH", "one")
    emu.configure()
    emu.launches(clear=True)
    cd.run_extension(emu, x, W, b, **kw)
    assert [e["kernel"] for e in emu.launches(clear=True)] == ["fused"]


def test_emulated_rejects_non_cpu_and_grad(emu):
    x, W, b, kw = make_case(T=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="CPU tensor"):
        cd.run_extension(emu, x.to("meta"), W, b, **kw)
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        cd.run_extension(emu, x, W, b, **kw)
    assert emu.EMULATED is True and emu.built_archs() == ["cpu-emulation"]
