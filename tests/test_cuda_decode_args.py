"""The arguments of the CUDA decode wrapper (proper_kernels.ops.cuda_decode): what
check_decode_args and unsupported_reason accept and reject (on CPU, no CUDA call),
the call without the extension, the dispatch threshold, and the inputs the wrapper
handles itself before the kernel, run through the CPU emulation: an empty user bank,
a plan with or without user_ids, unchecked ids outside the bank, d_out = 0.
"""
from __future__ import annotations

import os

import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import cuda_decode as cd
from proper_kernels.reference import lora_mixture_ref
from proper_kernels.testing import (
    DecodeRunner,
    call_decode,
    decode_loop_ref,
    make_decode_case,
)


@pytest.fixture(params=["two", "one"])
def run(request, emu):
    yield DecodeRunner.emulated(emu, request.param)
    emu.configure()


# ---- argument checks (CPU) -------------------------------------------------------------


def _check(x, W, b, **kw):
    return call_decode(cd.check_decode_args, x, W, b, require_cuda=False, **kw)


def test_check_accepts_valid_case():
    x, W, b, kw = make_decode_case(dtype=torch.bfloat16, top_k=2)
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
    x, W, b, kw = make_decode_case(dtype=torch.bfloat16, top_k=2)
    x, W, b, kw = mutate(x, W, b, kw)
    with pytest.raises(exc, match=match):
        _check(x, W, b, **kw)


def test_check_limits():
    x, W, b, kw = make_decode_case(dtype=torch.float16, K=65, r=1, user_lora=False, user_bias=False, router=False)
    with pytest.raises(ValueError, match="K <= 64"):
        _check(x, W, b, **kw)
    x, W, b, kw = make_decode_case(dtype=torch.float16, K=16, r=64, r_u=8)
    with pytest.raises(ValueError, match="exceeds"):
        _check(x, W, b, **kw)


def test_check_requires_cuda_tensors():
    x, W, b, kw = make_decode_case(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        call_decode(cd.check_decode_args, x, W, b, require_cuda=True, **kw)


@pytest.mark.skipif(cd.available(), reason="the extension is built here")
def test_call_without_extension_raises_runtime_error():
    x, W, b, kw = make_decode_case(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not built"):
        call_decode(cd.lora_mixture_decode_cuda, x, W, b, **kw)
    assert cd.built_archs() == []
    assert isinstance(cd.unavailable_reason(), str)


def test_emulated_rejects_non_cpu_and_grad(emu):
    x, W, b, kw = make_decode_case(T=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="CPU tensor"):
        DecodeRunner("emulated", None, emu)(x.to("meta"), W, b, **kw)
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        DecodeRunner("emulated", None, emu, no_grad=False)(x, W, b, **kw)
    assert emu.EMULATED is True and emu.built_archs() == ["cpu-emulation"]


def test_auto_falls_back_for_empty_d_in():
    """unsupported_reason covers every shape check_decode_args rejects (d_in = 0)."""
    x = torch.zeros(3, 0)
    assert call_decode(cd.unsupported_reason, x, torch.zeros(4, 0), None) is not None


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
        assert report()["cuda decode dispatch"].startswith("error: PROPER_KERNELS_CUDA_DECODE_MAX_T")
    finally:
        del os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"]
    os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"] = "16"
    try:
        assert cd.prefers_cuda_decode(1) == cd.available()
        assert not cd.prefers_cuda_decode(17)
    finally:
        del os.environ["PROPER_KERNELS_CUDA_DECODE_MAX_T"]


# ---- inputs the wrapper handles before the kernel (CPU emulation) ----------------------


def test_empty_user_bank(run):
    """N = 0 (user tensors with no users, every id -1) is legal: the user terms are
    zero, and the wrapper gives the kernel no user tensors (it needs ids for any)."""
    x, W, b, kw = make_decode_case(T=6, N=1, users="all_none", dtype=torch.float32, top_k=2)
    for name in ("user_logit_bias", "user_A", "user_B", "user_router"):
        kw[name] = kw[name][:0].contiguous()
    y, gates = run(x, W, b, return_gates=True, **kw)
    y_ref, g_ref = call_decode(lora_mixture_ref, x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-6)


def test_empty_user_bank_alone(run):
    """Only user adapters, with N = 0: nothing to add, y = 0 (the launcher's copy path)."""
    x, W, b, kw = make_decode_case(T=5, N=1, users="all_none", dtype=torch.float16, experts=False, weight=False, bias=False)
    for name in ("user_A", "user_B"):
        kw[name] = kw[name][:0].contiguous()
    y = run(x, W, b, out=torch.full((5, 80), float("nan"), dtype=torch.float16), **kw)
    assert torch.equal(y, torch.zeros(5, 80, dtype=torch.float16))


def test_plan_without_user_ids(run):
    """A plan carries the ids: check_decode_args accepts user tensors with a plan and
    no user_ids, and the kernel reads the plan's."""
    x, W, b, kw = make_decode_case(T=11, N=5, users="with_none", dtype=torch.float32, top_k=3)
    plan = pk.plan(kw["user_ids"], 5)
    y = run(x, W, b, plan=plan, **{k: v for k, v in kw.items() if k != "user_ids"})
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_plan_ids_are_the_ones_used(run):
    """With a plan and user_ids both given, the kernel runs on the plan's (range-checked)
    ids, as proper_kernels.lora_mixture does; user_ids that differ from them (here out
    of range, never checked) are refused before any launch."""
    x, W, b, kw = make_decode_case(T=9, N=5, users="distinct", dtype=torch.float32)
    plan = pk.plan(kw["user_ids"], 5)
    y = run(x, W, b, plan=plan, **dict(kw, user_ids=kw["user_ids"].clone()))
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    run.ext.launches(clear=True)
    other = torch.full_like(kw["user_ids"], 7)
    with pytest.raises(ValueError, match="plan does not belong to user_ids"):
        run(x, W, b, plan=plan, **dict(kw, user_ids=other))
    assert run.ext.launches(clear=True) == []


def test_unchecked_plan_ids_out_of_range_get_no_user(run):
    """Ids the plan holds are not checked again (e.g. new ids copied into a
    captured plan's buffer before a CUDA-graph replay); a token whose id is outside
    [0, N) gets no user terms and nothing outside the user bank is read."""
    x, W, b, kw = make_decode_case(T=9, N=5, users="distinct", dtype=torch.float32)
    plan = pk.plan(kw["user_ids"], 5)
    bad = kw["user_ids"].clone()
    bad[::2] = torch.tensor([5, 1000, -2, -(2 ** 31), 2 ** 31 - 1])
    plan.user_ids.copy_(bad)
    y = run(x, W, b, plan=plan, **{k: v for k, v in kw.items() if k != "user_ids"})
    y_ref, _ = decode_loop_ref(x, W, b, **dict(kw, user_ids=torch.where((bad >= 0) & (bad < 5), bad, -1)))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_out_must_not_overlap_plan_ids(emu):
    """out may not alias the plan's ids either (the kernel reads them while writing out)."""
    x, W, b, kw = make_decode_case(T=4, d_out=1, N=5, dtype=torch.float32)
    plan = pk.plan(kw.pop("user_ids"), 5)
    out = plan.user_ids.view(torch.float32).view(4, 1)
    with pytest.raises(ValueError, match="overlap"):
        DecodeRunner("emulated", None, emu)(x, W, b, plan=plan, out=out, **kw)


@pytest.mark.parametrize("parts", ["full", "experts only", "no experts"])
def test_zero_width_output(run, parts):
    """d_out = 0 is legal, as in the reference: y is [T, 0], the gates are computed."""
    case = dict(T=10, d_out=0, N=3, users="with_none", dtype=torch.float32, top_k=2)
    if parts == "experts only":
        case.update(user_lora=False, user_bias=False, user_router=False, weight=False, bias=False)
    if parts == "no experts":
        case.update(experts=False, top_k=None)
    x, W, b, kw = make_decode_case(**case)
    y, gates = run(x, W, b, return_gates=True, **kw)
    y_ref, g_ref = call_decode(lora_mixture_ref, x, W, b, **kw)
    assert y.shape == (10, 0) and y.dtype == x.dtype
    if g_ref is None:
        assert gates is None
    else:
        torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-6)
