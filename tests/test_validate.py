"""check_mixture_args: every bad input of lora_mixture raises a clear error naming the
argument before any compute; good input gives the sizes every backend needs."""
import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops.validate import MixtureSpec, check_mixture_args
from proper_kernels.reference import Adapters

T, D_IN, D_OUT, K, R, N, RU = 6, 8, 5, 3, 2, 4, 3


def good():
    return dict(
        x=torch.randn(T, D_IN), weight=torch.randn(D_OUT, D_IN), bias=torch.randn(D_OUT),
        expert_A=torch.randn(K, R, D_IN), expert_B=torch.randn(K, D_OUT, R),
        router_weight=torch.randn(K, D_IN), user_ids=torch.tensor([0, 1, -1, 3, 3, 2]),
        user_logit_bias=torch.randn(N, K), user_A=torch.randn(N, RU, D_IN),
        user_B=torch.randn(N, D_OUT, RU), user_router=torch.randn(N, K, RU),
    )


def call(**over):
    kw = good()
    kw.update(over)
    x, w, b = kw.pop("x"), kw.pop("weight"), kw.pop("bias")
    return pk.lora_mixture(x, w, b, **kw)


def test_good_case_runs_and_gives_the_sizes():
    assert call().shape == (T, D_OUT)
    kw = good()
    x, w, b, ids = kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("user_ids")
    spec = check_mixture_args(x.reshape(2, 3, D_IN), w, b, Adapters(**kw, top_k=2), ids.reshape(2, 3))
    assert spec == MixtureSpec(T=T, d_in=D_IN, d_out=D_OUT, K=K, r=R, N=N, r_u=RU, top_k=2, has_weight=True,
                               has_bias=True, has_experts=True, has_router=True, has_user_bias=True,
                               has_user_lora=True, has_user_router=True)


BAD = [
    (dict(user_ids=torch.tensor([0, 1, -1, 4, 3, 2])), ValueError, r"user_ids must lie in \[-1, 4\)"),
    (dict(user_ids=torch.tensor([0, 1, -2, 3, 3, 2])), ValueError, r"\[-1, 4\)"),
    (dict(user_ids=torch.tensor([0, 1, 2])), ValueError, r"user_ids must have shape \[6\]"),
    (dict(user_ids=torch.tensor([0.0] * 6)), TypeError, "user_ids must be an integer"),
    (dict(x=torch.randint(0, 3, (T, D_IN))), TypeError, "x must be a floating-point"),
    (dict(weight=torch.randn(D_OUT, D_IN + 1)), ValueError, r"weight must have shape \[d_out, d_in\]"),
    (dict(bias=torch.randn(D_OUT + 1)), ValueError, "bias must have shape"),
    (dict(expert_A=torch.randn(K, R, D_IN + 1)), ValueError, r"expert_A must have shape \[K, r, d_in\]"),
    (dict(expert_B=torch.randn(K, D_OUT, R + 1)), ValueError, r"expert_B must have shape \[K, d_out, r\]"),
    (dict(expert_B=torch.randn(K + 1, D_OUT, R)), ValueError, "expert_B"),
    (dict(expert_B=torch.randn(K, D_OUT + 2, R)), ValueError, "d_out"),
    (dict(expert_A=torch.randn(R, D_IN)), ValueError, "expert_A must be 3-D"),
    (dict(expert_B=None), ValueError, "must be given together"),
    (dict(router_weight=torch.randn(K + 1, D_IN)), ValueError, r"router_weight must have shape \[K, d_in\]"),
    (dict(user_logit_bias=torch.randn(N + 1, K)), ValueError, "users"),
    (dict(user_logit_bias=torch.randn(N, K + 1)), ValueError, r"user_logit_bias must have shape \[N, K\]"),
    (dict(user_A=torch.randn(N, RU, D_IN + 1)), ValueError, r"user_A must have shape \[N, r_u, d_in\]"),
    (dict(user_B=torch.randn(N, D_OUT, RU + 1)), ValueError, r"user_B must have shape \[N, d_out, r_u\]"),
    (dict(user_B=torch.randn(N + 1, D_OUT, RU)), ValueError, "users"),
    (dict(user_router=torch.randn(N, K, RU + 1)), ValueError, r"user_router must have shape \[N, K, r_u\]"),
    (dict(user_A=None, user_B=None), ValueError, "user_router .* pass user_A"),
    (dict(expert_A=None, expert_B=None), ValueError, "router_weight needs experts"),
    (dict(top_k=0), ValueError, r"top_k must be an int in \[1, K=3\]"),
    (dict(top_k=K + 1), ValueError, r"top_k must be an int in \[1, K=3\]"),
    (dict(top_k=1.5), ValueError, "top_k"),
    (dict(user_ids=None), ValueError, "pass user_ids"),
    (dict(router_weight=torch.randn(K, D_IN).to(torch.device("meta"))), ValueError, "router_weight is on meta"),
    (dict(user_router=torch.randn(N + 1, K, RU)), ValueError, "user_router has 5 users"),
    (dict(user_router=torch.randn(N, K + 1, RU)), ValueError, r"user_router must have shape \[N, K, r_u\]"),
    (dict(user_A=torch.randn(N + 1, RU, D_IN), user_B=torch.randn(N + 1, D_OUT, RU)), ValueError,
     "user_A has 5 users"),
    (dict(user_B=torch.randn(N, D_OUT + 1, RU)), ValueError, r"user_B must have shape .*d_out = weight.shape\[0\]"),
    (dict(user_A=torch.randn(N, RU + 1, D_IN)), ValueError, r"user_B must have shape .*r_u = user_A.shape\[1\]"),
    (dict(expert_A=torch.randn(K, R + 1, D_IN)), ValueError, r"expert_B .*r = expert_A.shape\[1\]"),
    (dict(expert_B=torch.randn(K, D_OUT)), ValueError, "expert_B must be 3-D"),
    (dict(weight=torch.randn(D_OUT, D_IN).double()[None]), ValueError, "weight must be 2-D"),
    (dict(user_ids=torch.tensor([0, 1, -1, 3, 3, 2]).to("meta")), ValueError, "user_ids is on meta"),
    (dict(user_ids=torch.tensor([0, 1, -1, 3, 3, 2]).reshape(2, 3)), ValueError, r"user_ids must have shape \[6\]"),
    (dict(top_k=True), ValueError, "top_k"),
    (dict(expert_scale="2"), TypeError, "expert_scale must be a real number"),
    (dict(user_scale=None), TypeError, "user_scale must be a real number"),
    (dict(user_scale=True), TypeError, "user_scale must be a real number"),
    (dict(expert_scale=torch.tensor(2.0, requires_grad=True)), TypeError,
     "expert_scale must be a real number .*tensor scale would get no gradient"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises(over, exc, msg):
    with pytest.raises(exc, match=msg):
        call(**over)


def test_adapters_must_be_adapters():
    kw = good()
    with pytest.raises(TypeError, match="adapters must be a proper_kernels.Adapters, got dict"):
        check_mixture_args(kw["x"], kw["weight"], kw["bias"], {"expert_A": kw["expert_A"]})


def test_plan_mismatch():
    with pytest.raises(ValueError, match="plan was built for 5 tokens"):
        call(plan=pk.plan(torch.zeros(5, dtype=torch.long), N))
    with pytest.raises(ValueError, match="num_users=9"):
        call(plan=pk.plan(torch.zeros(T, dtype=torch.long), 9))


def test_plan_must_be_a_routing_plan():
    ids = good()["user_ids"]
    with pytest.raises(TypeError, match=r"plan must be a RoutingPlan .*pk\.plan\(user_ids, num_users\).*Tensor"):
        call(plan=ids)


def test_plan_and_ids_must_agree():
    """With both, the plan is the routing and the ids must be the ones it was built
    from (RoutingPlan.check_ids, see test_plan): other ids raise, equal ids pass."""
    kw = good()
    x, w, b = kw.pop("x"), kw.pop("weight"), kw.pop("bias")
    ids = kw.pop("user_ids")
    p = pk.plan(ids, N)
    with pytest.raises(ValueError, match="plan does not belong to user_ids: token 1"):
        pk.lora_mixture(x, w, b, user_ids=torch.zeros_like(ids), plan=p, **kw)
    y_plan = pk.lora_mixture(x, w, b, user_ids=ids.clone(), plan=p, **kw)
    torch.testing.assert_close(y_plan, pk.lora_mixture(x, w, b, user_ids=ids, **kw))
    torch.testing.assert_close(pk.lora_mixture(x, w, b, plan=p, **kw), y_plan)  # the plan alone routes too


def test_no_output_size():
    with pytest.raises(ValueError, match="output size is undefined"):
        pk.lora_mixture(torch.randn(2, 3), None)


def test_zero_width_input_with_tokens():
    y = pk.lora_mixture(torch.randn(3, 0), torch.randn(4, 0), torch.ones(4))
    torch.testing.assert_close(y, torch.ones(3, 4))


def test_a_known_signature_still_checks_values_and_new_shapes():
    """The shape checks are remembered per signature of the arguments; the values (ids
    against the plan, their range) are checked at every call, and any other shape,
    dtype, device or type is a new signature, checked in full."""
    from proper_kernels.testing import mixture_case

    c = mixture_case(7, 16, 8, K=3, r=2, r_u=3, N=4)
    kw = c.kwargs()
    for _ in range(2):
        pk.lora_mixture(c.x, c.weight, c.bias, **kw)
    bad_ids = c.user_ids.clone()
    bad_ids[3] = 4
    with pytest.raises(ValueError, match=r"user_ids must lie in \[-1, 4\)"):
        pk.lora_mixture(c.x, c.weight, c.bias, **dict(kw, user_ids=bad_ids))
    with pytest.raises(ValueError, match="bias must have shape"):
        pk.lora_mixture(c.x, c.weight, c.bias[:-1], **kw)
    with pytest.raises(TypeError, match="expert_scale must be a real number"):
        pk.lora_mixture(c.x, c.weight, c.bias, **dict(kw, expert_scale=torch.tensor(1.0)))
    with pytest.raises(TypeError, match="user_A must be a torch.Tensor"):
        pk.lora_mixture(c.x, c.weight, c.bias, **dict(kw, user_A=c.adapters.user_A.tolist()))
    plan = pk.plan(c.user_ids, 4)
    pk.lora_mixture(c.x, c.weight, c.bias, **dict(kw, plan=plan))
    with pytest.raises(ValueError, match="plan does not belong to user_ids"):
        pk.lora_mixture(c.x, c.weight, c.bias, **dict(kw, plan=plan, user_ids=bad_ids.clamp(max=3).flip(0)))


def test_the_cpu_path_follows_the_environment(monkeypatch):
    """The CPU dispatch is remembered per signature, request, environment and grad
    need: PROPER_KERNELS_BACKEND set between two calls of the same signature counts."""
    from proper_kernels.ops import mixture as mixture_op
    from proper_kernels.testing import mixture_case

    c = mixture_case(7, 16, 8, K=3, r=2, r_u=3, N=4)
    calls = []
    real = mixture_op.lora_mixture_torch
    monkeypatch.setattr(mixture_op, "lora_mixture_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "torch")
    pk.lora_mixture(c.x, c.weight, c.bias, **c.kwargs())
    assert calls == [1]
    monkeypatch.setenv("PROPER_KERNELS_BACKEND", "reference")
    pk.lora_mixture(c.x, c.weight, c.bias, **c.kwargs())
    assert calls == [1]


@pytest.mark.parametrize("top_k", [True, 1.0, [1]])
def test_top_k_of_another_type_is_refused_after_a_valid_call(top_k):
    """True and 1.0 compare equal to 1: the remembered checks of top_k=1 must not pass
    them; an unhashable top_k gets the same message."""
    from proper_kernels.testing import mixture_case

    c = mixture_case(7, 16, 8, K=3, r=2, r_u=3, N=4)
    pk.lora_mixture(c.x, c.weight, c.bias, **dict(c.kwargs(), top_k=1))
    with pytest.raises(ValueError, match="top_k must be an int"):
        pk.lora_mixture(c.x, c.weight, c.bias, **dict(c.kwargs(), top_k=top_k))
