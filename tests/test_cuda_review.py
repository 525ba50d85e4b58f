"""Corner cases of the CUDA decode path found in review (CPU emulation of csrc/, and
the build helper). Helpers come from tests/test_cuda_decode.py."""
from __future__ import annotations

import functools

import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import cuda_decode as cd
from proper_kernels.reference import lora_mixture_ref
from test_cuda_decode import _load_build_cuda, decode_loop_ref, make_case

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu():
    try:
        return _load_build_cuda().load_emulator(ROOT)
    except RuntimeError as exc:
        pytest.skip(f"cannot build the CPU emulation: {exc}")


@pytest.fixture(params=["two", "one"])
def run(request, emu):
    emu.configure(sms=4 if request.param == "one" else 132)
    fn = functools.partial(cd.run_extension, emu, launch=request.param)

    def call(*args, **kw):
        with torch.no_grad():
            return fn(*args, **kw)

    yield call
    emu.configure()


def test_empty_user_bank(run):
    """N = 0 (user tensors with no users, every id -1) is legal: the user terms are
    zero. The kernel used to be called with r_u > 0 and no ids: RuntimeError."""
    x, W, b, kw = make_case(T=6, N=1, users="all_none", dtype=torch.float32, top_k=2)
    for name in ("user_logit_bias", "user_A", "user_B", "user_router"):
        kw[name] = kw[name][:0].contiguous()
    y, gates = run(x, W, b, return_gates=True, **kw)
    y_ref, g_ref = lora_mixture_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-6)


def test_plan_without_user_ids(run):
    """A plan carries the ids: check_decode_args accepts user tensors with a plan and
    no user_ids, so the kernel must read the plan's (it got none: RuntimeError)."""
    x, W, b, kw = make_case(T=11, N=5, users="with_none", dtype=torch.float32, top_k=3)
    plan = pk.plan(kw["user_ids"], 5)
    y = run(x, W, b, plan=plan, **{k: v for k, v in kw.items() if k != "user_ids"})
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_plan_ids_are_the_ones_used(run):
    """With a plan and user_ids both given, the plan's (range-checked) ids are used, as
    in proper_kernels.lora_mixture; the unchecked user_ids used to win."""
    x, W, b, kw = make_case(T=9, N=5, users="distinct", dtype=torch.float32)
    plan = pk.plan(kw["user_ids"], 5)
    other = torch.full_like(kw["user_ids"], 7)  # out of range: no range check ran on it
    y = run(x, W, b, plan=plan, **dict(kw, user_ids=other))
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_out_must_not_overlap_plan_ids(emu):
    x, W, b, kw = make_case(T=4, d_out=1, N=5, dtype=torch.float32)
    plan = pk.plan(kw.pop("user_ids"), 5)
    out = plan.user_ids.view(torch.float32).view(4, 1)
    with pytest.raises(ValueError, match="overlap"):
        cd.run_extension(emu, x, W, b, plan=plan, out=out, **kw)


@pytest.mark.parametrize("parts", ["full", "experts only", "no experts"])
def test_zero_width_output(run, parts):
    """d_out = 0 is legal (the reference returns [T, 0] and the gates); the launcher
    refused it with 'd_out out of range'."""
    case = dict(T=10, d_out=0, N=3, users="with_none", dtype=torch.float32, top_k=2)
    if parts == "experts only":
        case.update(user_lora=False, user_bias=False, user_router=False, weight=False, bias=False)
    if parts == "no experts":
        case.update(experts=False, top_k=None)
    x, W, b, kw = make_case(**case)
    y, gates = run(x, W, b, return_gates=True, **kw)
    y_ref, g_ref = lora_mixture_ref(x, W, b, **kw)
    assert y.shape == (10, 0) and y.dtype == x.dtype
    if g_ref is None:
        assert gates is None
    else:
        torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-6)


def test_auto_falls_back_for_empty_d_in():
    """unsupported_reason covers every shape check_decode_args rejects (d_in = 0)."""
    x = torch.zeros(3, 0)
    assert cd.unsupported_reason(x, torch.zeros(4, 0), None) is not None


def _build_cuda_that_would_build(monkeypatch):
    """python/build_cuda.py, where a build would be attempted (a CUDA toolkit, pybind11,
    no PROPER_KERNELS_SKIP_CUDA_BUILD); skips otherwise (the arch list is never read)."""
    bc = _load_build_cuda()
    if bc.find_cuda_home()[0] is None:
        pytest.skip("no CUDA toolkit: the build is skipped before the arch list is read")
    pytest.importorskip("pybind11")
    monkeypatch.delenv("PROPER_KERNELS_SKIP_CUDA_BUILD", raising=False)
    return bc


def test_require_build_fails_on_bad_arch_list(monkeypatch):
    """PROPER_KERNELS_REQUIRE_CUDA_BUILD=1 means a missing extension fails the install:
    a malformed arch list used to skip the build quietly and install without it."""
    bc = _build_cuda_that_would_build(monkeypatch)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_ARCH_LIST", "banana")
    assert bc.cuda_extensions(ROOT, verbose=False) == ([], {})
    monkeypatch.setenv("PROPER_KERNELS_REQUIRE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="banana"):
        bc.cuda_extensions(ROOT, verbose=False)
    monkeypatch.setenv("PROPER_KERNELS_SKIP_CUDA_BUILD", "1")  # an explicit skip still wins
    assert bc.cuda_extensions(ROOT, verbose=False) == ([], {})


def test_empty_arch_list_env_means_default(monkeypatch):
    """PROPER_KERNELS_CUDA_ARCH_LIST= (set but empty) is the default list, as torch's
    TORCH_CUDA_ARCH_LIST; it used to skip the build ('is empty')."""
    bc = _build_cuda_that_would_build(monkeypatch)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_ARCH_LIST", " ")
    exts, cmdclass = bc.cuda_extensions(ROOT, verbose=False)
    assert len(exts) == 1 and "build_ext" in cmdclass


def test_empty_user_bank_alone(run):
    """Only user adapters, with N = 0: nothing to add, y = 0 (the launcher's copy path)."""
    x, W, b, kw = make_case(T=5, N=1, users="all_none", dtype=torch.float16, experts=False, weight=False, bias=False)
    for name in ("user_A", "user_B"):
        kw[name] = kw[name][:0].contiguous()
    y = run(x, W, b, out=torch.full((5, 80), float("nan"), dtype=torch.float16), **kw)
    assert torch.equal(y, torch.zeros(5, 80, dtype=torch.float16))


def test_unchecked_plan_ids_out_of_range_get_no_user(run):
    """Documented: ids the plan holds are not checked again (e.g. new ids copied into a
    captured plan's buffer before a CUDA-graph replay); a token whose id is outside
    [0, N) gets no user terms and nothing outside the user bank is read."""
    x, W, b, kw = make_case(T=9, N=5, users="distinct", dtype=torch.float32)
    plan = pk.plan(kw["user_ids"], 5)
    bad = kw["user_ids"].clone()
    bad[::2] = torch.tensor([5, 1000, -2, -(2 ** 31), 2 ** 31 - 1])
    plan.user_ids.copy_(bad)
    y = run(x, W, b, plan=plan, **{k: v for k, v in kw.items() if k != "user_ids"})
    y_ref, _ = decode_loop_ref(x, W, b, **dict(kw, user_ids=torch.where((bad >= 0) & (bad < 5), bad, -1)))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
