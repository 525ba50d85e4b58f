"""The reference (both forms) against an independent per-token loop, gradcheck, and
the rank-space contract of the fused kernels against autograd."""
import math

import pytest
import torch

from proper_kernels import plan as make_plan
from proper_kernels.reference import (
    Adapters,
    balance_loss,
    lora_mixture_ref,
    lora_mixture_ref_loop,
    mixture_bwd_ref,
    mixture_fwd_ref,
)
from proper_kernels.testing import POPULARITY_LAWS, mixture_case

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PARTS = ("experts", "router", "user_bias", "user_lora", "user_router")
USER_TENSORS = ("user_logit_bias", "user_A", "user_B", "user_router")


def make_case(T, d_in, d_out, K, r, N, r_u, law="uniform", parts=PARTS, dtype=torch.float32, seed=0,
              weight=True, bias=True, no_user=0.0, top_k=None):
    """A MixtureCase with the parts named in ``parts``; B and V are non-zero so every term matters."""
    return mixture_case(T, d_in, d_out, K=K if "experts" in parts else 0, r=r, N=N,
                        r_u=r_u if "user_lora" in parts else 0, law=law, no_user=no_user, dtype=dtype, seed=seed,
                        weight=weight, bias=bias, router="router" in parts, user_bias="user_bias" in parts,
                        user_router="user_router" in parts, expert_scale=0.7, user_scale=1.3, top_k=top_k,
                        shuffle=False)


def per_token_loop(c, top_k=None):
    """DESIGN.md section 1 written token by token with float64 vectors (independent code)."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    x, W, b = f(c.x), f(c.weight), f(c.bias)
    A, B, Wr, C, Au, Bu, V = map(f, c.adapters.tensors())
    s_g, s_u = c.adapters.expert_scale, c.adapters.user_scale
    rows, gates = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        u = int(c.user_ids[t]) if c.user_ids is not None else -1
        y = torch.zeros(c.d_out, dtype=torch.float64)
        if W is not None:
            y += torch.mv(W, xt)
        if b is not None:
            y += b
        z = torch.mv(Au[u], xt) if (Au is not None and u >= 0) else None
        if A is not None:
            K = A.shape[0]
            logit = torch.zeros(K, dtype=torch.float64)
            if Wr is not None:
                logit += torch.mv(Wr, xt)
            if C is not None and u >= 0:
                logit += C[u]
            if V is not None and u >= 0:
                logit += torch.mv(V[u], z)
            keep = list(range(K))
            if top_k is not None:
                keep = sorted(range(K), key=lambda k: (-logit[k].item(), k))[:top_k]
            m = max(logit[k].item() for k in keep)
            w = {k: math.exp(logit[k].item() - m) for k in keep}
            s = sum(w.values())
            gt = torch.tensor([w.get(k, 0.0) / s for k in range(K)], dtype=torch.float64)
            for k in range(K):
                y += s_g * gt[k] * torch.mv(B[k], torch.mv(A[k], xt))
            gates.append(gt)
        if z is not None:
            y += s_u * torch.mv(Bu[u], z)
        rows.append(y)
    return torch.stack(rows), (torch.stack(gates) if gates else None)


def run(fn, c, **kw):
    return fn(c.x, c.weight, c.bias, c.adapters, c.user_ids, **kw)


SIZES = [  # T, d_in, d_out, K, r, N, r_u
    (1, 8, 5, 3, 2, 4, 3),
    (19, 24, 17, 4, 3, 7, 5),
    (37, 33, 40, 1, 1, 5, 1),
    (64, 16, 16, 8, 4, 64, 4),
]


@pytest.mark.parametrize("law", POPULARITY_LAWS)
@pytest.mark.parametrize("size", SIZES, ids=[f"T{s[0]}" for s in SIZES])
def test_reference_matches_per_token_loop(law, size):
    T, d_in, d_out, K, r, N, r_u = size
    c = make_case(T, d_in, d_out, K, r, N, r_u, law=law, no_user=0.2, seed=T + K)
    for top_k in (None, 1, 2):
        if top_k is not None and top_k > K:
            continue
        ck = c._replace(adapters=c.adapters._replace(top_k=top_k))
        y_tok, g_tok = per_token_loop(ck, top_k)
        for fn in (lora_mixture_ref, lora_mixture_ref_loop):
            y, g = run(fn, ck)
            torch.testing.assert_close(y.double(), y_tok, rtol=1e-5, atol=1e-5, msg=f"{fn.__name__} top_k={top_k}")
            torch.testing.assert_close(g.double(), g_tok, rtol=1e-5, atol=1e-6, msg=f"{fn.__name__} top_k={top_k}")


SUBSETS = [(), ("experts",), ("experts", "router"), ("user_lora",), ("experts", "user_bias"),
           ("experts", "router", "user_lora"), PARTS]


@pytest.mark.parametrize("parts", SUBSETS, ids=["+".join(p) or "base" for p in SUBSETS])
@pytest.mark.parametrize("weight", [True, False])
def test_every_subset_of_parts(parts, weight):
    """Both forms on every subset of the parts, with and without W0 (the public op on
    each backend: test_lora_mixture.test_every_subset_on_every_backend)."""
    c = make_case(13, 24, 10, 3, 2, 6, 3, parts=parts, weight=weight, no_user=0.3)
    y_tok, g_tok = per_token_loop(c)
    for fn in (lora_mixture_ref, lora_mixture_ref_loop):
        y, g = run(fn, c, d_out=10)
        torch.testing.assert_close(y.double(), y_tok, rtol=1e-5, atol=1e-5, msg=fn.__name__)
        assert (g is None) == (g_tok is None)


def test_users_with_no_tokens_and_one_user_owning_all():
    c = make_case(23, 16, 12, 3, 2, 50, 4, law="identical")
    assert c.user_ids.unique().numel() == 1  # 49 users without tokens
    y_tok, _ = per_token_loop(c)
    torch.testing.assert_close(run(lora_mixture_ref, c)[0].double(), y_tok, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    c = make_case(31, 48, 40, 4, 4, 6, 4, dtype=dtype)
    y, g = run(lora_mixture_ref, c)
    assert y.dtype == dtype and g.dtype == torch.float32
    y32, _ = run(lora_mixture_ref, c.to(torch.float32))
    # The only error left is the final rounding to the output dtype.
    eps = torch.finfo(dtype).eps
    assert (y.float() - y32).abs().max() <= eps * y32.abs().max() * 2


def _gradcheck_case(parts, top_k=None):
    c = make_case(7, 6, 5, 3, 2, 4, 2, parts=parts, dtype=torch.float64, no_user=0.3, seed=3, top_k=top_k)
    names = [k for k, v in c.adapters._asdict().items() if torch.is_tensor(v)]

    def f(x, W, b, *ts):
        y, g = lora_mixture_ref(x, W, b, c.adapters._replace(**dict(zip(names, ts))), c.user_ids)
        return (y, g) if g is not None else y

    inputs = [c.x, c.weight, c.bias] + [getattr(c.adapters, k) for k in names]
    return f, [t.clone().requires_grad_(True) for t in inputs]


@pytest.mark.parametrize("parts,top_k", [(PARTS, None), (PARTS, 2), (("experts", "router"), None),
                                         (("user_lora",), None)],
                         ids=["all", "all-top2", "experts+router", "user_lora"])
def test_gradcheck_every_parameter(parts, top_k):
    f, inputs = _gradcheck_case(parts, top_k)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("law", ["distinct", "skewed"])
def test_rankspace_contract_matches_autograd(top_k, law):
    c = make_case(17, 12, 9, 3, 2, 5, 3, law=law, dtype=torch.float64, no_user=0.2, top_k=top_k)
    P = Adapters.from_flat([t.clone().requires_grad_(True) for t in c.adapters.tensors()], 0.7, 1.3, top_k)
    xr, Wr, br = (t.clone().requires_grad_(True) for t in (c.x, c.weight, c.bias))
    y_ref, g_ref = lora_mixture_ref(xr, Wr, br, P, c.user_ids)
    dy = torch.randn_like(y_ref)
    auto = torch.autograd.grad(y_ref, [xr, Wr, br, *P.tensors()], dy)
    y, h, z, g = mixture_fwd_ref(c.x, c.weight, c.bias, c.adapters, c.user_ids, 9)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(g, g_ref.detach())
    grads = mixture_bwd_ref(dy, c.x, h, z, g, c.weight, c.adapters, c.user_ids, (True,) * 10)
    for name, a, m in zip(["x", "W", "b", *c.adapters._fields], auto, grads):
        torch.testing.assert_close(m, a, msg=name)


@pytest.mark.parametrize("law", ["zipf", "identical", "distinct"])
def test_segmented_user_products_match_gathered(law, monkeypatch):
    """Large batches take the per-segment path for the user terms: same results."""
    import proper_kernels.reference.mixture as ref

    c = make_case(29, 20, 11, 3, 2, 6, 3, law=law, no_user=0.2, dtype=torch.float64, top_k=2)
    a = Adapters.from_flat([t.requires_grad_(True) for t in c.adapters.tensors()], 0.7, 1.3, 2)
    y1, g1 = lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)
    grads1 = torch.autograd.grad(y1.sum(), [a.user_A, a.user_B, a.user_router])
    monkeypatch.setattr(ref, "_GATHER_LIMIT", 0)
    y2, g2 = lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)
    grads2 = torch.autograd.grad(y2.sum(), [a.user_A, a.user_B, a.user_router])
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(g2, g1)
    for u, v in zip(grads2, grads1):
        torch.testing.assert_close(u, v)


def test_empty_user_bank_all_ids_minus_one():
    """N = 0 users (every id -1): the user terms vanish, as in the kernels."""
    import proper_kernels as pk

    c = make_case(6, 8, 5, 3, 2, 4, 3)
    empty = c.adapters._replace(**{k: getattr(c.adapters, k)[:0] for k in USER_TENSORS})
    ids = torch.full((6,), -1)
    bare = c.adapters._replace(**{k: None for k in USER_TENSORS})
    expected, g_exp = lora_mixture_ref(c.x, c.weight, c.bias, bare, ids)
    for fn in (lora_mixture_ref, lora_mixture_ref_loop):
        y, g = fn(c.x, c.weight, c.bias, empty, ids)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(g, g_exp)
    y = pk.lora_mixture(c.x, c.weight, c.bias, backend="reference", plan=make_plan(ids, 0),
                        **dict(empty._asdict(), user_ids=ids))
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("fn", [lora_mixture_ref, lora_mixture_ref_loop])
@pytest.mark.parametrize("name", ["user_A", "user_logit_bias"])
def test_reference_user_tensors_need_ids(fn, name):
    """Both forms refuse user tensors without ids (no silent 'every token is user -1')."""
    c = make_case(5, 8, 5, 3, 2, 4, 3)
    a = c.adapters
    if name == "user_logit_bias":
        a = a._replace(user_A=None, user_B=None, user_router=None)
    with pytest.raises(ValueError, match="user_ids"):
        fn(c.x, c.weight, c.bias, a, None)


def test_users_without_tokens_get_exactly_zero_grads():
    c = make_case(9, 6, 5, 3, 2, 6, 2, dtype=torch.float64)
    ids = torch.tensor([0, 2, -1, 2, 0, 5, -1, 5, 0])
    for top_k in (None, 1, 2):
        P = {k: getattr(c.adapters, k).clone().requires_grad_(True) for k in USER_TENSORS}
        y, g = lora_mixture_ref(c.x, c.weight, c.bias, c.adapters._replace(top_k=top_k, **P), ids)
        grads = torch.autograd.grad(y.square().sum() + balance_loss(g), [P[k] for k in USER_TENSORS])
        for k, gr in zip(USER_TENSORS, grads):
            assert gr[[1, 3, 4]].abs().max().item() == 0.0, k
