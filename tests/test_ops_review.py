"""Dispatch corner cases of the public op found in review (CPU, fast)."""
import pytest
import torch

import proper_kernels as pk
from proper_kernels.testing import make_mixture_inputs

needs_interp = pytest.mark.skipif(
    torch.cuda.is_available() or "triton" not in pk.available_backends("cpu"),
    reason="checks the Triton CPU interpreter's dispatch",
)


def _bf16_case(params_bf16=True):
    m = make_mixture_inputs(5, 16, 12, K=3, r=2, r_u=2, N=3)
    x, w, b = m.pop("x").bfloat16(), m.pop("weight"), m.pop("bias")
    if params_bf16:
        w, b = w.bfloat16(), b.bfloat16()
        m = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in m.items()}
    return x, w, b, m


@needs_interp
@pytest.mark.parametrize("params_bf16", [True, False])
def test_auto_bf16_under_interpreter_is_correct(params_bf16):
    """The interpreter's tl.dot is wrong for bfloat16: auto must not send bf16 there."""
    x, w, b, kw = _bf16_case(params_bf16)
    x = x.requires_grad_()
    y = pk.lora_mixture(x, w, b, backend="auto", **kw)
    y.float().square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    y_ref = pk.lora_mixture(xr, w, b, backend="reference", **kw)
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, xr.grad)


@needs_interp
def test_forced_triton_bf16_under_interpreter_raises():
    x, w, b, kw = _bf16_case()
    with pytest.raises(RuntimeError, match="backend='triton'.*bfloat16"):
        pk.lora_mixture(x, w, b, backend="triton", **kw)


def _backends():
    return [b for b in ("reference", "triton") if b in pk.available_backends("cpu")]


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float64, torch.float64)])
def test_dtype_policy_is_the_same_on_every_backend(x_dtype, p_dtype):
    """Compute dtype follows x; y in x.dtype, gates in the compute dtype, grads in each tensor's dtype."""
    m = make_mixture_inputs(5, 16, 12, K=3, r=2, r_u=2, N=3, dtype=p_dtype)
    x = m.pop("x").to(x_dtype)
    w, b = m.pop("weight"), m.pop("bias")
    cd = torch.float64 if x_dtype == torch.float64 else torch.float32
    out = {}
    for be in _backends():
        P = {k: (v.clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in m.items()}
        xx = x.clone().requires_grad_()
        y, g = pk.lora_mixture(xx, w, b, backend=be, return_gates=True, **P)
        assert y.dtype == x_dtype and g.dtype == cd, be
        y.float().square().sum().backward()
        assert xx.grad.dtype == x_dtype and P["user_A"].grad.dtype == p_dtype, be
        out[be] = (y.float(), g, P["user_A"].grad.float())
    for a, c in zip(*out.values()) if len(out) == 2 else ():
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("triton_v,numpy_v,broken", [
    ((3, 6), (2, 4), True), ((3, 6), (2, 2), False), ((3, 7), (2, 4), False), ((3, 9), (2, 3), False),
    (None, (2, 4), False),
])
def test_interpreter_problem_names_the_fix(monkeypatch, triton_v, numpy_v, broken):
    """Interpreters of triton < 3.7 cannot run with numpy >= 2.3: the reason says so
    and how to fix it (auto then uses the reference, backend='triton' raises it)."""
    from proper_kernels.triton import target

    monkeypatch.setattr(target, "_version", lambda dist: {"triton": triton_v, "numpy": numpy_v}[dist])
    target.interpreter_problem.cache_clear()
    try:
        why = target.interpreter_problem()
    finally:
        monkeypatch.undo()
        target.interpreter_problem.cache_clear()
    assert bool(why) is broken
    if broken:
        assert "triton 3.6" in why and "numpy 2.4" in why and "triton >= 3.7 or numpy < 2.3" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_adapter_is_the_base_linear(dtype):
    """No adapter tensor: y is F.linear itself (no fp32 copy of W0 per call), within
    rounding of the fp32-accumulating reference, with grads for x and W0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    W = torch.randn(17, 24, generator=g).to(dtype).requires_grad_()
    b = torch.randn(17, generator=g).to(dtype)
    y, gates = pk.lora_mixture(x, W, b, return_gates=True)
    assert gates is None and y.dtype == dtype and y.shape == (2, 5, 17)
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    ref = (x.double() @ W.double().t() + b.double()).to(dtype)
    torch.testing.assert_close(y, ref, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 8)
    y.sum().backward()
    assert x.grad is not None and W.grad is not None
    # a W0 in another dtype than x keeps the documented policy (compute in x's precision via the op)
    y32 = pk.lora_mixture(x.detach().float(), W.detach(), b)
    assert y32.dtype == torch.float32
