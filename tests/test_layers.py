"""ProperLinear: identity at creation, parts and switches, losses, merge, growth."""
import pytest
import torch
from torch import nn

from proper_kernels import lora_mixture
from proper_kernels.layers import ProperLinear, UserRouting

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FULL = dict(num_experts=4, expert_rank=3, user_embed_dim=5, num_users=6, user_rank=2, population_rank=3)


def _layer(**kw):
    torch.manual_seed(0)
    base = nn.Linear(24, 17)
    return base, ProperLinear(base, **{**FULL, **kw})


@pytest.mark.parametrize("kw", [FULL, dict(num_experts=0), dict(num_users=0), dict(top_k=2),
                                dict(user_embed_dim=0), dict(population_rank=0)])
def test_identity_at_creation(kw):
    base, m = _layer(**kw)
    x = torch.randn(3, 5, 24)
    ids = torch.tensor([1, -1, 5]) if m.num_users else torch.full((3,), -1)
    m.routing = UserRouting(ids, m.num_users)
    assert torch.equal(m(x), base(x))


def test_base_frozen_and_shared():
    base, m = _layer()
    assert m.weight is base.weight and not m.weight.requires_grad and not m.bias.requires_grad
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"population_A", "population_B", "expert_A", "expert_B", "router_weight", "user_embedding",
                     "user_embed_proj", "user_A", "user_B", "user_router"}
    _, m2 = _layer(freeze_base=False)
    assert m2.weight.requires_grad


def test_matches_functional_op_and_gates():
    _, m = _layer(population_rank=0)
    with torch.no_grad():
        for p in (m.expert_B, m.user_B, m.user_router):
            p.normal_()
    x, ids = torch.randn(11, 24), torch.tensor([0, 1, 2, -1, 5, 5, 5, 0, 1, 4, 3])
    y = m(x, user_ids=ids)
    y_ref, g_ref = lora_mixture(
        x, m.weight, m.bias, expert_A=m.expert_A, expert_B=m.expert_B, expert_scale=m.expert_scale,
        router_weight=m.router_weight, user_ids=ids, user_logit_bias=m.user_embedding @ m.user_embed_proj.t(),
        user_A=m.user_A, user_B=m.user_B, user_scale=m.user_scale, user_router=m.user_router, return_gates=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(m.last_gates, g_ref)
    assert m.balance_loss().item() >= 0 and 0 <= m.diversity_loss().item() <= 1


def test_switches():
    _, m = _layer(population_rank=0)
    with torch.no_grad():
        m.expert_B.normal_()
        m.user_B.normal_()
    x, ids = torch.randn(7, 24), torch.tensor([0, 1, 2, 3, 4, 5, -1])
    full = m(x, user_ids=ids)
    m.use_user_lora = False
    no_user = m(x, user_ids=ids)
    m.use_experts = False
    plain = m(x, user_ids=ids)
    assert m.last_gates is None
    torch.testing.assert_close(plain, nn.functional.linear(x, m.weight, m.bias))
    assert not torch.allclose(full, no_user) and not torch.allclose(no_user, plain)


def test_user_ids_required_and_checked():
    _, m = _layer()
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="pass user_ids"):
        m(x)
    with pytest.raises(ValueError, match=r"\[-1, 6\)"):
        m(x, user_ids=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="1-D"):
        UserRouting(torch.zeros(2, 2, dtype=torch.long), 6)
    m.routing = UserRouting(torch.tensor([0, 1]), 6)
    with pytest.raises(ValueError, match="2 rows"):
        m(torch.randn(3, 5, 24))


def test_routing_plan_shared_per_shape():
    r = UserRouting(torch.tensor([3, -1]), 4)
    x = torch.randn(2, 5, 8)
    ids, p = r.for_input(x)
    assert ids.tolist() == [[3] * 5, [-1] * 5]
    assert r.for_input(torch.randn(2, 5, 8))[1] is p
    assert r.for_input(torch.randn(2, 1, 8))[1] is not p


def test_merge_population_keeps_output():
    base, m = _layer(num_experts=0, num_users=0)
    with torch.no_grad():
        m.population_B.normal_()
    x = torch.randn(9, 24)
    before = m(x)
    assert not torch.allclose(before, base(x))
    m.merge_population()
    assert m.population_A is None
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_population_rounds_once(dtype):
    """In 16-bit the merged W0 is W0 + s_p B_p A_p formed in fp32 and rounded once."""
    base, m = _layer(num_experts=0, num_users=0)
    m = m.to(dtype)
    with torch.no_grad():
        m.population_B.normal_()
        m.weight.mul_(100)  # |W0| >> |delta|: rounding delta first would lose bits
    w0, a, b = m.weight.detach().clone(), m.population_A.detach().clone(), m.population_B.detach().clone()
    m.merge_population()
    want = (w0.float() + m.population_scale * (b.float() @ a.float())).to(dtype)
    assert torch.equal(m.weight, want)


def test_add_users_fresh_and_gradients_per_user():
    _, m = _layer(population_rank=0)
    old_A = m.user_A.detach().clone()
    m.add_users(3)
    assert m.num_users == 9 and m.user_A.shape[0] == 9 and m.user_embedding.shape[0] == 9
    assert torch.equal(m.user_A[:6], old_A) and torch.equal(m.user_B[6:], torch.zeros_like(m.user_B[6:]))
    x = torch.randn(5, 24)
    ids = torch.tensor([7, 7, 1, -1, 7])
    m(x, user_ids=ids).pow(2).sum().backward()
    touched = {int(u) for u in (m.user_B.grad.abs().sum((1, 2)) > 0).nonzero()}
    assert touched == {1, 7}  # only users with tokens get gradients


def test_bad_constructor_args():
    with pytest.raises(TypeError, match="nn.Linear"):
        ProperLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="top_k"):
        ProperLinear(nn.Linear(4, 4), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_users"):
        ProperLinear(nn.Linear(4, 4), num_users=-1)


def test_add_users_creates_bank_from_none():
    base = nn.Linear(12, 7)
    m = ProperLinear(base, num_experts=2, expert_rank=2, user_embed_dim=3, num_users=0, user_rank=2)
    assert m.user_A is None and m.user_embedding is None
    m.add_users(2)
    assert m.user_A.shape == (2, 2, 12) and m.user_router.shape == (2, 2, 2) and m.user_embedding.shape == (2, 3)
    assert m.use_user_lora and m.use_user_bias and m.use_user_router
    x = torch.randn(4, 12)
    y = m(x, user_ids=torch.tensor([0, 1, -1, 1]))
    torch.testing.assert_close(y, base(x))  # fresh users start at the group-level output
    y.sum().backward()
    assert m.user_A.grad is not None


def test_add_users_follows_a_cast_of_the_module():
    m = ProperLinear(nn.Linear(12, 7), num_experts=2, expert_rank=2, user_embed_dim=3, num_users=0, user_rank=2)
    m.to(torch.bfloat16)
    m.add_users(2)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    y = m(torch.randn(4, 12, dtype=torch.bfloat16), user_ids=torch.tensor([0, 1, -1, 1]))
    assert y.dtype == torch.bfloat16
