"""The public op ``proper_kernels.lora_mixture`` end to end, on every backend this
machine runs: shapes and leading dims, return_gates, the dtype policy (mixed dtypes
included), gradients and a few training steps. Results follow the one tolerance rule
against the reference in fp64 (oracle) and fp32 (baseline) on the same inputs."""
import pytest
import torch

import proper_kernels as pk
from proper_kernels.reference import Adapters, balance_loss, lora_mixture_ref
from proper_kernels.testing import assert_close, at_fp64_and_fp32, mixture_case

pytestmark = pytest.mark.usefixtures("torch_one_thread", "triton_interpreter_nested_calls")

BACKENDS = [b for b in ("reference", "torch", "triton") if b in pk.available_backends("cpu")]
# backend="triton" on the CPU runs the kernels in the Triton interpreter.
needs_triton = pytest.mark.skipif("triton" not in pk.available_backends("cpu"),
                                  reason="needs the Triton CPU interpreter (TRITON_INTERPRET=1)")


def reference_pair(c, **kw):
    """(fp64, fp32) (y, gates) of the reference on the case's inputs."""
    return at_fp64_and_fp32(lambda x, w, b, a: lora_mixture_ref(x, w, b, a, c.user_ids, d_out=c.d_out, **kw),
                            c.x, c.weight, c.bias, c.adapters)


def test_leading_dims_and_empty_batch():
    c = mixture_case(12, 16, 8, K=3, r=2, r_u=3, N=4)
    kw = c.kwargs()
    x3, ids3 = c.x.reshape(3, 4, 16), kw.pop("user_ids").reshape(3, 4)
    y3, g3 = pk.lora_mixture(x3, c.weight, c.bias, user_ids=ids3, return_gates=True, **kw)
    y2 = pk.lora_mixture(c.x, c.weight, c.bias, user_ids=ids3.reshape(12), **kw)
    assert y3.shape == (3, 4, 8) and g3.shape == (3, 4, 3)
    torch.testing.assert_close(y3.reshape(12, 8), y2)
    e = pk.lora_mixture(c.x[:0].reshape(0, 5, 16), c.weight, c.bias, user_ids=ids3[:0].reshape(0, 5), **kw)
    assert e.shape == (0, 5, 8)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
def test_empty_batch_returns_empty(backend):
    c = mixture_case(0, 8, 5, K=3, r=2, r_u=3, N=4)
    y, g = pk.lora_mixture(c.x, c.weight, c.bias, return_gates=True, backend=backend, **c.kwargs())
    assert y.shape == (0, 5) and g.shape == (0, 3) and y.dtype == c.x.dtype


def test_uniform_gates_without_router_input():
    c = mixture_case(9, 16, 8, K=5, r=2, r_u=0, N=0, router=False)
    _, g = pk.lora_mixture(c.x, c.weight, c.bias, return_gates=True, **c.kwargs())
    torch.testing.assert_close(g, torch.full((9, 5), 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_adapter_is_the_base_linear(dtype):
    """No adapter tensor: y is F.linear itself (no fp32 copy of W0 per call), within
    rounding of the fp32-accumulating reference, with grads for x and W0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    W = torch.randn(17, 24, generator=g).to(dtype).requires_grad_()
    b = torch.randn(17, generator=g).to(dtype)
    y, gates = pk.lora_mixture(x, W, b, return_gates=True, backend="auto")
    assert gates is None and y.dtype == dtype and y.shape == (2, 5, 17)
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    ref64, ref32 = at_fp64_and_fp32(torch.nn.functional.linear, x.detach(), W.detach(), b)
    assert_close("y", y, ref64, ref32)
    y.sum().backward()
    assert x.grad is not None and W.grad is not None
    # a W0 in another dtype than x keeps the documented policy (compute in x's precision via the op)
    y32 = pk.lora_mixture(x.detach().float(), W.detach(), b)
    assert y32.dtype == torch.float32


SUBSETS = {  # mixture_case arguments of each subset of the parts
    "base": dict(K=0, r_u=0, N=0),
    "experts": dict(r_u=0, N=0, router=False),
    "experts+router": dict(r_u=0, N=0),
    "user_lora": dict(K=0),
    "experts+user_bias": dict(r_u=0, router=False),
    "experts+router+user_lora": dict(user_bias=False, user_router=False),
    "all": dict(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [True, False], ids=["W0", "no_W0"])
@pytest.mark.parametrize("parts", list(SUBSETS))
def test_every_subset_on_every_backend(parts, weight, backend):
    """Every subset of the parts, with and without W0: y and the gates (None exactly
    when there are no experts) as the reference computes them."""
    c = mixture_case(13, 24, 10, **dict(dict(K=3, r=2, r_u=3, N=6, no_user=0.3, weight=weight), **SUBSETS[parts]))
    y, g = pk.lora_mixture(c.x, c.weight, c.bias, return_gates=True, backend=backend, **c.kwargs())
    (y64, g64), (y32, g32) = reference_pair(c)
    assert_close("y", y, y64, y32)
    assert (g is None) == (g32 is None)
    if g is not None:
        assert_close("gates", g, g64, g32)


@needs_triton
def test_backend_triton_leading_dims_top_k_and_gates():
    c = mixture_case(3 * 7, 24, 20, K=3, r=4, r_u=5, N=4, seed=11, top_k=2)
    kw = dict(c.kwargs(), user_ids=c.user_ids.reshape(3, 7))
    y, g = pk.lora_mixture(c.x.reshape(3, 7, 24), c.weight, c.bias, return_gates=True, backend="triton", **kw)
    assert y.shape == (3, 7, 20) and g.shape == (3, 7, 3) and g.dtype == torch.float32
    (y64, g64), (y32, g32) = reference_pair(c)
    assert_close("y", y.reshape(21, 20), y64, y32)
    assert_close("gates", g.reshape(21, 3), g64, g32)


@needs_triton
def test_strided_bias():
    """A non-contiguous bias reads the right elements (weight None: the 'mixture'
    variant; with W0: the base variants)."""
    torch.manual_seed(0)
    x, A, B = torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(2, 12, 3)
    b = torch.randn(24)[::2]
    for w in (None, torch.randn(12, 16)):
        y = pk.lora_mixture(x, w, b, expert_A=A, expert_B=B, backend="triton")
        ref64, ref32 = at_fp64_and_fp32(lambda *t: lora_mixture_ref(t[0], t[1], t[2], Adapters(t[3], t[4]))[0],
                                        x, w, b, A, B)
        assert_close(f"y (W0 {'given' if w is not None else 'None'})", y, ref64, ref32)


def _grads_of(x, w, b, adapters, ids, dy, op):
    """(y, gates, dx, d adapter tensors) of y.backward(dy) through ``op``."""
    x = x.detach().clone().requires_grad_()
    a = adapters._replace(**{k: v.detach().clone().requires_grad_() for k, v in adapters._asdict().items()
                             if torch.is_tensor(v)})
    y, g = op(x, w, b, a, ids)
    y.backward(dy)
    return y, g, x.grad, [t.grad for t in a.tensors() if t is not None]


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float64, torch.float64)], ids=["x16-p32", "x32-p16", "fp64"])
def test_dtype_policy_is_the_same_on_every_backend(x_dtype, p_dtype):
    """Compute dtype follows x; y in x.dtype, gates in the compute dtype, every grad in
    its tensor's dtype; values as the reference's."""
    c = mixture_case(5, 16, 12, K=3, r=2, r_u=2, N=3, dtype=p_dtype)
    x = c.x.to(x_dtype)
    cd = torch.float64 if x_dtype == torch.float64 else torch.float32
    dy = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    ref64, ref32 = at_fp64_and_fp32(lambda *t: _grads_of(*t[:4], c.user_ids, t[4], lambda *a: lora_mixture_ref(*a)),
                                    x, c.weight, c.bias, c.adapters, dy)
    for be in BACKENDS:
        def op(x, w, b, a, ids):
            return pk.lora_mixture(x, w, b, backend=be, return_gates=True, **dict(a._asdict(), user_ids=ids))

        y, g, dx, dparams = _grads_of(x, c.weight, c.bias, c.adapters, c.user_ids, dy, op)
        assert y.dtype == x_dtype and g.dtype == cd and dx.dtype == x_dtype, be
        assert all(d.dtype == p_dtype for d in dparams), be
        # 16-bit x: the kernels' backward rounds the rank-space codes to x's dtype
        # before its dots (test_triton_bwd), so every gradient has x's precision.
        lowp = x_dtype in (torch.float16, torch.bfloat16)
        for name, o, r64, r32 in zip(["y", "gates", "dx", *[k for k, v in c.adapters._asdict().items()
                                                              if torch.is_tensor(v)]],
                                     (y, g, dx, *dparams), (*ref64[:3], *ref64[3]), (*ref32[:3], *ref32[3])):
            assert_close(f"{be} {name}", o, r64, r32, dtype=x_dtype if lowp and name != "gates" else None)


def _train(backend, opt_name, dtype=torch.float32, steps=3):
    c = mixture_case(33, 20, 16, K=3, r=4, r_u=4, N=5, law="zipf", seed=11, bias=False, top_k=2, dtype=dtype)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in c.adapters._asdict().items() if torch.is_tensor(v)}
    bias = torch.nn.Parameter(torch.zeros(16, dtype=dtype))
    opt_cls = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}
    opt = opt_cls[opt_name]([*params.values(), bias])
    target = torch.randn(33, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = c.x.clone().requires_grad_(True)  # dx flows too (as into an earlier layer)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        y, g = pk.lora_mixture(x, c.weight, bias, user_ids=c.user_ids, top_k=2, expert_scale=c.adapters.expert_scale,
                               user_scale=c.adapters.user_scale, backend=backend, return_gates=True, **params)
        loss = torch.nn.functional.mse_loss(y, target) + 0.1 * balance_loss(g)
        loss.backward()
        opt.step()
        history.append([loss.detach(), x.grad.clone(), *(v.detach().clone() for v in params.values())])
    return history


@needs_triton
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_matches_reference(opt_name):
    """A few optimizer steps with backend="triton" follow the reference's: the loss,
    dx and every parameter after each step."""
    tri = _train("triton", opt_name)
    ref64 = _train("reference", opt_name, torch.float64)
    ref32 = _train("reference", opt_name)
    names = ["loss", "dx", "expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B",
             "user_router"]
    for step, (t, r64, r32) in enumerate(zip(tri, ref64, ref32)):
        for name, o, a, b in zip(names, t, r64, r32):
            assert_close(f"step {step}: {name}", o, a, b)
