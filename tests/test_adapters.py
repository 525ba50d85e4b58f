"""Adapters: the named value that carries one layer's adapter tensors through the core."""
import pytest
import torch

from proper_kernels.reference import ADAPTER_TENSORS, Adapters, lora_mixture_ref, lora_mixture_ref_loop
from proper_kernels.testing import make_mixture_inputs


def _full():
    return Adapters.from_kwargs(make_mixture_inputs(5, 8, 6, K=3, r=2, r_u=4, N=7))


def test_fields_and_flat_order():
    assert Adapters._fields[: len(ADAPTER_TENSORS)] == ADAPTER_TENSORS
    assert Adapters._fields[len(ADAPTER_TENSORS):] == ("expert_scale", "user_scale", "top_k")
    a = _full()
    assert all(t is getattr(a, name) for t, name in zip(a.tensors(), ADAPTER_TENSORS))
    b = Adapters.from_flat(a.tensors(), expert_scale=0.5, user_scale=3.0, top_k=2)
    assert b.tensors() == a.tensors() and (b.expert_scale, b.user_scale, b.top_k) == (0.5, 3.0, 2)


def test_from_kwargs_ignores_other_keys():
    m = make_mixture_inputs(5, 8, 6, K=3, r=2, r_u=4, N=7)
    a = Adapters.from_kwargs(m)
    assert a.expert_A is m["expert_A"] and a.user_router is m["user_router"]
    assert (a.expert_scale, a.user_scale, a.top_k) == (m["expert_scale"], m["user_scale"], None)
    assert Adapters.from_kwargs({"x": m["x"], "weight": m["weight"]}) == Adapters()


def test_sizes():
    a = _full()
    assert (a.num_experts, a.expert_rank, a.user_rank, a.num_users) == (3, 2, 4, 7)
    assert a.has_user_terms and not a.is_empty()
    empty = Adapters()
    assert (empty.num_experts, empty.expert_rank, empty.user_rank, empty.num_users) == (0, 0, 0, None)
    assert not empty.has_user_terms and empty.is_empty()
    assert Adapters(expert_scale=2.0, top_k=1).is_empty()  # scalars alone adapt nothing
    # N comes from whichever user-indexed tensor exists.
    assert Adapters(user_logit_bias=torch.zeros(9, 3)).num_users == 9
    assert Adapters(user_router=torch.zeros(4, 3, 2)).num_users == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_to_converts_tensors_only(dtype):
    a = _full()._replace(router_weight=None, expert_scale=0.1, top_k=2)
    b = a.to(dtype)
    assert all(t.dtype == dtype for t in b.tensors() if t is not None)
    assert b.router_weight is None and (b.expert_scale, b.user_scale, b.top_k) == (0.1, a.user_scale, 2)
    assert a.expert_A.dtype == torch.float32  # a new value: the original is untouched


@pytest.mark.parametrize("fn", [lora_mixture_ref, lora_mixture_ref_loop])
def test_reference_takes_adapters_only(fn):
    m = make_mixture_inputs(5, 8, 6, K=3, r=2, r_u=4, N=7)
    with pytest.raises(TypeError, match="adapters must be a proper_kernels.Adapters, got dict"):
        fn(m["x"], m["weight"], m["bias"], {"expert_A": m["expert_A"]}, m["user_ids"])
