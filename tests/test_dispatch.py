"""The one path decision (proper_kernels/ops/dispatch.py): every Path it can return,
each reason as ``proper_kernels.explain`` shows it, the backends that cannot run and
their errors, and $PROPER_KERNELS_BACKEND. Nothing here runs a kernel: the CUDA
branches are reached on the CPU by monkeypatching the dispatch's device checks."""
import re

import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import cuda_decode, dispatch, torch_backend
from proper_kernels.ops.dispatch import BACKENDS, Path, available_backends, requested_backend
from proper_kernels.testing import assert_close, at_fp64_and_fp32, make_mixture_inputs, mixture_case

pytestmark = pytest.mark.usefixtures("torch_one_thread")

INTERP_REASON = "Triton kernels usable on cpu"


def case(T=6, dtype=torch.float32, **kw):
    c = mixture_case(T, 16, 12, K=3, r=2, r_u=2, N=3, dtype=dtype, **kw)
    return c.x, c.weight, c.bias, c.kwargs()


def explain(x, w, b, kw, **over):
    return pk.explain(x, w, b, **dict(kw, **over))


def assert_torch_path(path, requested, reason):
    """The torch backend, in either variant, after ``reason`` (the variant's own
    reason: test_torch_variant_*)."""
    assert (path.backend, path.requested) == ("torch", requested), path
    assert path.forward in torch_backend.VARIANTS, path
    assert path.reason.startswith(f"{reason}: the torch backend, {path.forward} variant ("), path.reason


@pytest.fixture
def interpreter(monkeypatch):
    """The Triton CPU interpreter usable, whatever this process was started with."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_INTERPRETER_PROBLEM", None)


@pytest.fixture
def fake_cuda(monkeypatch, interpreter):
    """The CUDA decode kernel usable for CPU tensors, with a decode limit of 8 tokens."""
    monkeypatch.setattr(dispatch, "_cuda_unusable", lambda device: None)
    monkeypatch.setattr(cuda_decode, "decode_threshold", lambda device=None, dtype=None: 8)


def test_backends_and_path_fields():
    assert BACKENDS == ("auto", "reference", "torch", "triton", "cuda")
    assert Path._fields == ("backend", "requested", "reason", "forward")
    assert pk.Path is Path and pk.available_backends is available_backends


# ----------------------------------------------------------------------------- requested backend


def test_requested_backend_argument_then_env_then_auto(monkeypatch):
    monkeypatch.delenv("PROPER_KERNELS_BACKEND", raising=False)
    assert requested_backend(None) == "auto"
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "")
    assert requested_backend(None) == "auto"
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "reference")
    assert requested_backend(None) == "reference"
    assert requested_backend("triton") == "triton"  # the argument wins over the env
    x, w, b, kw = case()
    assert explain(x, w, b, kw).requested == "reference"
    assert explain(x, w, b, kw, backend="auto").requested == "auto"


def test_bad_backend_names_its_source(monkeypatch):
    x, w, b, kw = case()
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of {BACKENDS}, got 'fast'")):
        pk.lora_mixture(x, w, b, backend="fast", **kw)
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"backend \(from \$PROPER_KERNELS_BACKEND\) must be one of .*'fast'"):
        pk.lora_mixture(x, w, b, **kw)
    with pytest.raises(ValueError, match=r"PROPER_KERNELS_BACKEND.*'fast'"):
        explain(x, w, b, kw)


def test_bad_backend_rejected_on_empty_batch_too(monkeypatch):
    x, w, b, kw = case(T=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.lora_mixture(x, w, b, backend="fast", **kw)
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"PROPER_KERNELS_BACKEND.*'fast'"):
        pk.lora_mixture(x, w, b, **kw)


def test_explain_validates_like_the_op():
    x, w, b, kw = case()
    with pytest.raises(ValueError, match=r"weight must have shape \[d_out, d_in\]"):
        pk.explain(x, w[:, :-1], b, **kw)
    with pytest.raises(ValueError, match=r"user_ids must lie in \[-1, 3\)"):
        explain(x, w, b, kw, user_ids=torch.full((6,), 3))


# ----------------------------------------------------------------------------- paths any machine takes


@pytest.mark.parametrize("backend", [None, "auto", "reference", "triton", "cuda"])
def test_no_tokens_is_the_reference(backend, monkeypatch):
    """T = 0: nothing to launch, whatever was asked for (even a backend that cannot run
    here); backend='torch' keeps its own path (test_requested_torch)."""
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "auto")  # what backend=None reads
    x, w, b, kw = case(T=0)
    path = explain(x, w, b, kw, backend=backend)
    assert path == Path("reference", backend or "auto", "no tokens (T = 0)", "reference")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_adapter_is_the_base_linear(backend):
    x, w, b, _ = case()
    assert pk.explain(x, w, b, backend=backend) == Path(
        "base", backend, "no adapter tensor: the base linear alone", "base")
    # Scalars alone adapt nothing.
    assert pk.explain(x, w, b, backend=backend, expert_scale=3.0).backend == "base"


def test_base_needs_the_base_in_x_dtype(interpreter):
    """F.linear needs one dtype: a W0 or b in another dtype takes the mixture path,
    which computes in x's precision."""
    x, w, b, _ = case()
    assert pk.explain(x, w.double(), b, backend="reference").backend == "reference"
    assert pk.explain(x, w, b.half(), backend="auto").backend == "triton"
    assert pk.explain(x, None, b, backend="reference").backend == "reference"  # no W0: no base linear


def test_requested_reference():
    x, w, b, kw = case()
    assert explain(x, w, b, kw, backend="reference") == Path(
        "reference", "reference", "backend='reference' was requested", "reference")


# ----------------------------------------------------------------------------- torch


@pytest.mark.parametrize("T", [6, 0])
def test_requested_torch(T):
    """By name the torch backend runs whatever the inputs: no tokens, no adapter."""
    x, w, b, kw = case(T=T)
    assert_torch_path(explain(x, w, b, kw, backend="torch"), "torch", "backend='torch' was requested")
    assert_torch_path(pk.explain(x, w, b, backend="torch"), "torch", "backend='torch' was requested")


def test_torch_variant_without_user_terms_is_wide():
    c = mixture_case(6, 16, 12, K=3, r=2, r_u=0, N=0)
    path = pk.explain(c.x, c.weight, c.bias, backend="torch", **c.kwargs())
    assert path.forward == "wide" and path.reason.endswith("wide variant (no user terms)")


def test_torch_variant_of_a_large_bank_is_segment():
    N = torch_backend.WIDE_MAX_RANK // 4 + 1  # N (r_u + K) = 4 N > WIDE_MAX_RANK
    c = mixture_case(6, 16, 12, K=2, r=2, r_u=2, N=N, law="identical")
    path = pk.explain(c.x, c.weight, c.bias, backend="torch", **c.kwargs())
    assert path.forward == "segment"
    assert path.reason.endswith(f"segment variant (a large bank: N (r_u + K) = {4 * N} > "
                                f"{torch_backend.WIDE_MAX_RANK})")


def test_torch_variant_on_cpu_follows_the_bank():
    """On the CPU a bank wider than CPU_WIDE_MAX_RANK rank columns groups the user
    terms by the plan's segments, a smaller one takes wide; CUDA and torch.compile
    take wide (test_torch_backend.test_choose_variant)."""
    c = mixture_case(256, 256, 256, K=4, r=8, r_u=16, N=32, law="identical", no_user=0.0)
    path = pk.explain(c.x, c.weight, c.bias, backend="torch", **c.kwargs())
    assert path.forward == "segment"
    assert path.reason.endswith("segment variant (on the CPU the user terms follow the tokens (N (r_u + K) = 640 > "
                                f"{torch_backend.CPU_WIDE_MAX_RANK}), grouped by the plan's segments)")
    kw = {k: v for k, v in c.kwargs().items() if k != "user_ids"}
    assert pk.explain(c.x, c.weight, c.bias, backend="torch", plan=pk.plan(c.user_ids, 32), **kw) == path
    small = mixture_case(16, 32, 24, K=4, r=8, r_u=8, N=16)
    path = pk.explain(small.x, small.weight, small.bias, backend="torch", **small.kwargs())
    assert path.forward == "wide"
    assert f"wide variant (a small bank on the CPU: N (r_u + K) = 192 <= {torch_backend.CPU_WIDE_MAX_RANK}" in path.reason


def test_requested_triton_runs_the_kernels(interpreter):
    x, w, b, kw = case()
    assert explain(x, w, b, kw, backend="triton") == Path(
        "triton", "triton", "backend='triton' was requested", "triton")
    assert pk.explain(x, w, b, backend="triton").backend == "triton"  # asked for by name: no base shortcut


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fp64_forward_is_the_rankspace_torch_contract(interpreter, backend):
    """The forward kernels have no fp64 variant: the forward runs the rank-space torch
    contract and the backward still runs the kernels."""
    x, w, b, kw = case(dtype=torch.float64)
    path = explain(x, w, b, kw, backend=backend)
    assert (path.backend, path.forward) == ("triton", "torch")
    assert "no torch.float64 variant" in path.reason and "the backward runs the kernels" in path.reason


def test_requested_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, kw = case()
    with pytest.raises(RuntimeError, match=r"backend='triton' is not usable on cpu: it needs triton and a CUDA "
                                           r"device \(or TRITON_INTERPRET=1 on CPU\); here x is a CPU tensor and "
                                           "TRITON_INTERPRET=1 is not set"):
        explain(x, w, b, kw, backend="triton")


def test_requested_triton_without_triton_raises(monkeypatch, interpreter):
    real = dispatch._module
    monkeypatch.setattr(dispatch, "_module", lambda name: None if name == "triton" else real(name))
    x, w, b, kw = case()
    with pytest.raises(RuntimeError, match="backend='triton' is not usable on cpu: .*here triton is not installed"):
        explain(x, w, b, kw, backend="triton")
    assert_torch_path(explain(x, w, b, kw, backend="auto"), "auto", "no Triton: triton is not installed")
    assert available_backends("cpu") == ["reference", "torch"]


def test_broken_interpreter_is_the_reason(monkeypatch, interpreter):
    why = "the CPU interpreter of triton 3.6 fails with numpy 2.4 (int() of one-element arrays): install ..."
    monkeypatch.setattr(dispatch, "_INTERPRETER_PROBLEM", why)
    x, w, b, kw = case()
    with pytest.raises(RuntimeError, match="backend='triton' is not usable on cpu: .*here the CPU interpreter of "
                                           "triton 3.6 fails"):
        explain(x, w, b, kw, backend="triton")
    assert_torch_path(explain(x, w, b, kw, backend="auto"), "auto", "no Triton: " + why)


def test_no_triton_kernels_for_other_devices(interpreter):
    c = make_mixture_inputs(4, 8, 6, K=2, r=2, r_u=0, device="meta")
    kw = dict(expert_A=c["expert_A"], expert_B=c["expert_B"], router_weight=c["router_weight"])
    with pytest.raises(RuntimeError, match="backend='triton' is not usable on meta: .*here no Triton kernels for "
                                           "meta tensors"):
        pk.explain(c["x"], c["weight"], c["bias"], backend="triton", **kw)
    path = pk.explain(c["x"], c["weight"], c["bias"], backend="auto", **kw)
    assert_torch_path(path, "auto", "no Triton: no Triton kernels for meta tensors")  # (no CUDA note: not a GPU)
    assert available_backends("meta") == ["reference", "torch"]


@pytest.mark.parametrize("where", ["x", "parameters"])
def test_bf16_never_reaches_the_interpreter(interpreter, where):
    """The interpreter's tl.dot is wrong for bfloat16: backend='triton' refuses it by
    name, auto takes the torch backend (for a bf16 x or any bf16 parameter)."""
    x, w, b, kw = case()
    if where == "x":
        x = x.bfloat16()
    else:
        kw = dict(kw, user_A=kw["user_A"].bfloat16())
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run these inputs on cpu: the Triton CPU "
                                           r"interpreter computes tl.dot wrongly for bfloat16 \(use float16/float32\), "
                                           "or backend='reference'"):
        explain(x, w, b, kw, backend="triton")
    assert_torch_path(explain(x, w, b, kw, backend="auto"), "auto", "no Triton: the Triton CPU interpreter "
                      "computes tl.dot wrongly for bfloat16 (use float16/float32)")


@pytest.mark.parametrize("params_bf16", [True, False])
def test_auto_bf16_under_interpreter_is_correct(interpreter, params_bf16):
    """What auto runs for bf16 on the interpreter is right, values and gradients
    (the torch backend, per test_bf16_never_reaches_the_interpreter)."""
    c = mixture_case(5, 16, 12, K=3, r=2, r_u=2, N=3, no_user=0.0)
    if params_bf16:
        c = c.to(torch.bfloat16)
    c = c._replace(x=c.x.bfloat16())
    dy = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).bfloat16()

    def run(c_, backend):
        x = c_.x.clone().requires_grad_()
        y = pk.lora_mixture(x, c_.weight, c_.bias, backend=backend, **c_.kwargs())
        y.backward(dy.to(y.dtype))
        return y, x.grad

    out = run(c, "auto")
    for name, o, r64, r32 in zip(("y", "dx"), out, *at_fp64_and_fp32(lambda c_: run(c_, "reference"), c)):
        assert_close(name, o, r64, r32)


def test_auto_on_cpu_without_interpreter_is_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, kw = case()
    assert_torch_path(explain(x, w, b, kw, backend="auto"), "auto",
                      "no Triton: x is a CPU tensor and TRITON_INTERPRET=1 is not set")
    assert available_backends("cpu") == ["reference", "torch"]


def test_auto_on_cpu_with_interpreter_is_triton(interpreter):
    x, w, b, kw = case()
    assert explain(x, w, b, kw, backend="auto") == Path("triton", "auto", INTERP_REASON, "triton")
    assert available_backends("cpu") == ["reference", "torch", "triton"]


# ----------------------------------------------------------------------------- cuda


def test_requested_cuda_on_cpu_raises():
    x, w, b, kw = case()
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not usable on cpu: it needs the built "
                                           r"proper_kernels._C extension and a CUDA tensor; here x is a cpu tensor "
                                           r"\(the CUDA decode kernel needs CUDA tensors\)"):
        pk.lora_mixture(x, w, b, backend="cuda", **kw)


def test_requested_cuda_without_extension_raises(monkeypatch):
    """On a CUDA tensor without the built extension: the reason says how to build it."""
    real = dispatch._cuda_unusable
    monkeypatch.setattr(dispatch, "_cuda_unusable", lambda device: real(torch.device("cuda")))
    monkeypatch.setattr(cuda_decode, "available", lambda: False)
    monkeypatch.setattr(cuda_decode, "unavailable_reason", lambda: "the CUDA extension proper_kernels._C is not built")
    x, w, b, kw = case()
    with pytest.raises(RuntimeError, match="backend='cuda' is not usable on cpu: .*here the CUDA extension "
                                           "proper_kernels._C is not built"):
        explain(x, w, b, kw, backend="cuda")


def test_requested_cuda(fake_cuda):
    x, w, b, kw = case()
    assert explain(x, w, b, kw, backend="cuda") == Path("cuda", "cuda", "backend='cuda' was requested", "cuda")
    kw = dict(kw, expert_A=kw["expert_A"].requires_grad_())
    with pytest.raises(RuntimeError, match=r"backend='cuda' is forward-only \(decode\): run it under "
                                           r"torch.no_grad\(\) or use 'triton'"):
        explain(x, w, b, kw, backend="cuda")
    with torch.no_grad():
        assert explain(x, w, b, kw, backend="cuda").backend == "cuda"


def test_auto_inference_batch_is_cuda(fake_cuda):
    x, w, b, kw = case(T=8)
    assert explain(x, w, b, kw, backend="auto") == Path(
        "cuda", "auto", "inference batch of T = 8 <= 8 on a GPU with the CUDA decode kernel", "cuda")


@pytest.mark.parametrize("what", ["x", "weight", "adapter"])
def test_grad_requiring_inputs_never_choose_cuda(fake_cuda, what):
    x, w, b, kw = case()
    if what == "x":
        x = x.requires_grad_()
    elif what == "weight":
        w = w.requires_grad_()
    else:
        kw = dict(kw, user_router=kw["user_router"].requires_grad_())
    path = explain(x, w, b, kw, backend="auto")
    assert path == Path("triton", "auto", "CUDA decode is forward-only and an input requires grad; " + INTERP_REASON,
                        "triton")
    with torch.no_grad():  # no graph is recorded: the decode kernel serves
        assert explain(x, w, b, kw, backend="auto").backend == "cuda"


def test_auto_above_the_decode_limit_is_triton(fake_cuda):
    x, w, b, kw = case(T=9)
    assert explain(x, w, b, kw, backend="auto") == Path(
        "triton", "auto", "T = 9 is above the CUDA decode limit 8 (decode table / PROPER_KERNELS_CUDA_DECODE_MAX_T); "
        + INTERP_REASON, "triton")


def test_auto_inputs_the_decode_kernel_does_not_take(fake_cuda, monkeypatch):
    x, w, b, kw = case(dtype=torch.float64)
    path = explain(x, w, b, kw, backend="auto")
    assert path.backend == "triton" and path.forward == "torch"
    assert path.reason.startswith("CUDA decode cannot take these inputs: x must be float16, bfloat16 or float32 "
                                  "[T, d_in], got dtype torch.float64; " + INTERP_REASON)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # and no Triton either: the notes add up
    assert_torch_path(explain(x, w, b, kw, backend="auto"), "auto", path.reason.split("; ")[0] + "; no Triton: x is "
                      "a CPU tensor and TRITON_INTERPRET=1 is not set")


def test_cuda_path_calls_the_decode_wrapper(fake_cuda, monkeypatch):
    """lora_mixture follows the decision: on the cuda path it hands the decode kernel
    the flattened x, the Adapters and the ids, already checked (no second check)."""
    calls = []

    def decode(x2, weight, bias, adapters, spec, user_ids, *, return_gates):
        calls.append((x2.shape, adapters, user_ids))
        return pk.lora_mixture_ref(x2, weight, bias, adapters, user_ids)

    monkeypatch.setattr(cuda_decode, "decode_checked", decode)
    c = mixture_case(6, 16, 12, K=3, r=2, r_u=2, N=3, top_k=2)
    x = c.x.reshape(2, 3, 16)
    y, g = pk.lora_mixture(x, c.weight, c.bias, return_gates=True, backend="auto",
                           **dict(c.kwargs(), user_ids=c.user_ids.view(2, 3)))
    (shape, adapters, ids), = calls
    assert shape == (6, 16) and isinstance(adapters, pk.Adapters) and adapters.top_k == 2
    assert torch.equal(ids, c.user_ids)
    assert y.shape == (2, 3, 12) and g.shape == (2, 3, 3)
    torch.testing.assert_close(y.reshape(6, 12), pk.lora_mixture_ref(c.x, c.weight, c.bias, c.adapters,
                                                                     c.user_ids)[0])


def test_available_backends_with_cuda(fake_cuda):
    assert available_backends("cpu") == ["reference", "torch", "triton", "cuda"]


def test_explain_reads_the_plan(interpreter):
    """With a plan the dispatch sees the plan's ids, with or without user_ids."""
    x, w, b, kw = case()
    ids = kw.pop("user_ids")
    p = pk.plan(ids, 3)
    assert pk.explain(x, w, b, plan=p, backend="auto", **kw) == explain(x, w, b, dict(kw, user_ids=ids),
                                                                         backend="auto")


def test_explain_takes_the_ops_keywords_and_names_the_valid_ones():
    """explain accepts what lora_mixture accepts (return_gates does not change the path)
    and refuses a misspelt keyword listing the valid ones."""
    c = mixture_case(9, 16, 8)
    assert pk.explain(c.x, c.weight, c.bias, return_gates=True, **c.kwargs()) == \
        pk.explain(c.x, c.weight, c.bias, **c.kwargs())
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['expert_a'\].*expert_A, expert_B"):
        pk.explain(c.x, c.weight, expert_a=c.kwargs()["expert_A"])
