"""The custom ops proper_kernels::mixture_fwd / mixture_bwd, their fakes and
LoraMixtureFunction (proper_kernels/ops/autograd.py): opcheck, torch.compile with
fullgraph, gradcheck of the whole op, the gates' own gradient and frozen inputs.
On the CPU the ops run the Triton kernels in the interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import skip_if_interpreter_broken  # noqa: E402

pytest.importorskip("triton")
skip_if_interpreter_broken()

import proper_kernels as pk  # noqa: E402
from proper_kernels.ops import autograd  # noqa: E402
from proper_kernels.reference import balance_loss, lora_mixture_ref, mixture_fwd_ref  # noqa: E402
from proper_kernels.testing import assert_close, at_fp64_and_fp32, mixture_case  # noqa: E402

pytestmark = [pytest.mark.usefixtures("torch_one_thread", "triton_interpreter_nested_calls"),
              pytest.mark.skipif("triton" not in pk.available_backends("cpu") and not torch.cuda.is_available(),
                                 reason="the custom ops run the Triton kernels: needs CUDA or TRITON_INTERPRET=1")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def fwd_args(c, impl="triton"):
    """The arguments of proper_kernels::mixture_fwd for a MixtureCase."""
    p = c.plan()  # None without user-indexed tensors: the ops then take no plan tensors
    a = c.adapters
    uid, order = (p.user_ids, p.order) if p is not None else (None, None)
    return (c.x, c.weight, c.bias, *a.tensors(), uid, order, a.expert_scale, a.user_scale,
            a.top_k or 0, c.d_out, impl)


@pytest.mark.parametrize("impl,dtype,top_k", [("triton", torch.float32, 0), ("triton", torch.float32, 2),
                                              ("torch", torch.float64, 2)])
def test_opcheck_mixture_fwd(impl, dtype, top_k):
    """Schema, fake vs real (shapes, dtypes), autograd registration, AOT dispatch;
    then the outputs against the rank-space contract."""
    c = mixture_case(11, 24, 20, K=3, r=4, r_u=5, N=4, seed=10, dtype=dtype, top_k=top_k or None, device=DEV)
    args = fwd_args(c, impl)
    torch.library.opcheck(torch.ops.proper_kernels.mixture_fwd.default, args)
    out = torch.ops.proper_kernels.mixture_fwd(*args)
    ref64, ref32 = at_fp64_and_fp32(mixture_fwd_ref, c.x, c.weight, c.bias, c.adapters, c.user_ids, c.d_out)
    for name, o, r64, r32 in zip("yhzg", out, ref64, ref32):
        assert_close(name, o, r64, r32)


def bwd_args(c, dy, needs, dg=True):
    """The arguments of proper_kernels::mixture_bwd (codes from the contract's forward)."""
    _, h, z, g = mixture_fwd_ref(c.x, c.weight, None, c.adapters, c.user_ids, c.d_out)
    p = c.plan()
    a = c.adapters
    order, seg = (p.order, p.seg_offsets) if p is not None else (None, None)
    return (dy, c.x, h, z, g, torch.randn_like(g) if dg else None, c.weight, a.expert_A, a.expert_B,
            a.router_weight, a.user_A, a.user_B, a.user_router, order, seg, a.expert_scale,
            a.user_scale, list(needs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_opcheck_mixture_bwd(dtype):
    """The bwd custom op vs its fake (shapes, dtypes: dx in x.dtype), schema, no aliasing."""
    c = mixture_case(37, 40, 24, K=3, r=5, r_u=6, N=5, dtype=dtype, bias=False, device=DEV)
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEV)
    args = bwd_args(c, dy, [True, False, True, True, True, True, True, True, True, True])
    torch.library.opcheck(torch.ops.proper_kernels.mixture_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.proper_kernels.mixture_bwd(*args)
    assert out[0].dtype == dtype and out[1].numel() == 0


@pytest.mark.parametrize("parts", [dict(K=0), dict(r_u=0, N=0), dict(weight=False, user_router=False)],
                         ids=["no_experts", "no_users", "no_weight_no_V"])
def test_fakes_match_real_outputs(parts):
    """The fakes give the real outputs' shapes and dtypes for layers without some
    parts too ([T, 0] codes, [0] gradients), so a compiled graph of any layer traces."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = mixture_case(5, 16, 12, **dict(dict(K=3, r=2, r_u=3, N=4, bias=False, device=DEV), **parts))
    dy = torch.randn(5, 12, device=DEV)
    fwd = fwd_args(c, "torch")
    bwd = bwd_args(c, dy, [True] * 10)
    real_f = torch.ops.proper_kernels.mixture_fwd(*fwd)
    real_b = torch.ops.proper_kernels.mixture_bwd(*bwd)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def fake(args):
            return [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]

        fake_f = torch.ops.proper_kernels.mixture_fwd(*fake(fwd))
        fake_b = torch.ops.proper_kernels.mixture_bwd(*fake(bwd))
    for i, (r, f) in enumerate(zip((*real_f, *real_b), (*fake_f, *fake_b))):
        assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype), i


def test_torch_compile_fullgraph_public_api():
    c = mixture_case(13, 24, 20, K=3, r=4, r_u=5, N=4, seed=12, top_k=2, device=DEV)
    plan = pk.plan(c.user_ids, c.N)
    kw = {k: v for k, v in c.kwargs().items() if k != "user_ids"}

    def f(x, w, b):
        return pk.lora_mixture(x, w, b, plan=plan, backend="triton", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(c.x, c.weight, c.bias)
    ref64, ref32 = at_fp64_and_fp32(lambda x, w, b, a: lora_mixture_ref(x, w, b, a, c.user_ids)[0],
                                    c.x, c.weight, c.bias, c.adapters)
    assert_close("y", y, ref64, ref32)


def test_gradcheck_whole_op():
    """Through lora_mixture(backend="triton") in fp64: the rank-space torch forward
    (the dispatch's fp64 path) and the backward kernels, every input."""
    c = mixture_case(7, 6, 5, K=3, r=2, r_u=2, N=3, seed=6, dtype=torch.float64, device=DEV)
    names = [k for k, v in c.adapters._asdict().items() if torch.is_tensor(v)]
    ins = tuple(t.clone().requires_grad_(True) for t in (c.x, c.weight, c.bias, *c.adapters.tensors()))
    assert pk.explain(*ins[:3], backend="triton", **dict(zip(names, ins[3:])), user_ids=c.user_ids).forward == "torch"

    def f(x, w, b, *ts):
        return pk.lora_mixture(x, w, b, user_ids=c.user_ids, expert_scale=c.adapters.expert_scale,
                               user_scale=c.adapters.user_scale, backend="triton", **dict(zip(names, ts)))

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


ROUTER = ["router_weight", "user_logit_bias", "user_A", "user_router", "expert_A"]


def _router_grads(c, backend, with_y):
    """Grads of the router's inputs from (mean y^2 +) the balance loss of the gates."""
    leaves = {k: getattr(c.adapters, k).detach().clone().requires_grad_(True) for k in ROUTER}
    kw = dict(c.kwargs(), **leaves)
    y, g = pk.lora_mixture(c.x, c.weight, c.bias, return_gates=True, backend=backend, **kw)
    (y.square().mean() + balance_loss(g) if with_y else balance_loss(g)).backward()
    return [leaves[k].grad for k in ROUTER]


@pytest.mark.parametrize("with_y", [True, False], ids=["y_and_gates", "gates_only"])
def test_balance_loss_trains_router_through_kernels(with_y):
    """The gates' gradient (the balance loss) joins the softmax backward of the
    kernels; with the gates alone (y unused) it still reaches the router."""
    c = mixture_case(37, 40, 24, K=3, r=5, r_u=6, N=5, top_k=None, device=DEV)
    tri = _router_grads(c, "triton", with_y)
    ref64, ref32 = at_fp64_and_fp32(lambda c_: _router_grads(c_, "reference", with_y), c)
    for k, o, a, b in zip(ROUTER, tri, ref64, ref32):
        if b is None:  # the gates do not depend on it (A_g, from the gates alone)
            assert o is None or o.abs().max() == 0, k
            continue
        assert_close(k, o, a, b)
    assert tri[0].abs().sum() > 0


def test_frozen_inputs_get_no_gradient(monkeypatch):
    """Inputs that do not require grad are off in the backward's needs (nothing is
    computed for them) and get None; the others match the reference."""
    seen = []
    real = autograd.mixture_bwd_op

    def spy(*args):
        seen.append(list(args[-1]))
        return real(*args)

    monkeypatch.setattr(autograd, "mixture_bwd_op", spy)
    c = mixture_case(9, 16, 12, K=3, r=2, r_u=3, N=4, seed=3, device=DEV)
    trained = ("expert_B", "user_A")

    def grads(c_, backend):
        leaves = {k: getattr(c_.adapters, k).detach().clone().requires_grad_(True) for k in trained}
        kw = dict(c_.kwargs(), **leaves)
        pk.lora_mixture(c_.x, c_.weight, c_.bias, backend=backend, **kw).square().sum().backward()
        assert all(kw[k].grad is None for k in ("expert_A", "router_weight", "user_B")), backend
        return [leaves[k].grad for k in trained]

    out = grads(c, "triton")
    #               x      W0     b      A_g    B_g   W_r    c      A_u   B_u    V
    assert seen == [[False, False, False, False, True, False, False, True, False, False]]
    ref64, ref32 = at_fp64_and_fp32(lambda c_: grads(c_, "reference"), c)
    for name, o, a, b in zip(trained, out, ref64, ref32):
        assert_close(name, o, a, b)
