"""The reference (both forms) against an independent per-token loop, gradcheck,
the rank-space contract and the auxiliary losses."""
import math

import pytest
import torch

import proper_kernels as pk
from proper_kernels.reference import (
    balance_loss,
    diversity_loss,
    lora_mixture_ref,
    lora_mixture_ref_loop,
    mixture_bwd_ref,
    mixture_fwd_ref,
)
from proper_kernels.testing import POPULARITY_LAWS, sample_user_ids

PARTS = ("experts", "router", "user_bias", "user_lora", "user_router")


def make_case(T, d_in, d_out, K, r, N, r_u, law="uniform", parts=PARTS, dtype=torch.float32,
              seed=0, weight=True, bias=True, no_user_frac=0.0):
    """Random inputs of lora_mixture; B and V are non-zero so every term matters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    ids = sample_user_ids(T, N, law, generator=g) if N else torch.full((T,), -1)
    if no_user_frac and T:
        drop = torch.rand(T, generator=g) < no_user_frac
        ids = torch.where(drop, torch.full_like(ids, -1), ids)
    kw = dict(user_ids=ids, expert_scale=0.7, user_scale=1.3)
    if "experts" in parts:
        kw.update(expert_A=rnd(K, r, d_in, scale=d_in ** -0.5), expert_B=rnd(K, d_out, r, scale=r ** -0.5))
        if "router" in parts:
            kw["router_weight"] = rnd(K, d_in, scale=d_in ** -0.5)
        if "user_bias" in parts and N:
            kw["user_logit_bias"] = rnd(N, K)
    if "user_lora" in parts and N:
        kw.update(user_A=rnd(N, r_u, d_in, scale=d_in ** -0.5), user_B=rnd(N, d_out, r_u, scale=r_u ** -0.5))
        if "user_router" in parts and "experts" in parts:
            kw["user_router"] = rnd(N, K, r_u)
    if not any(k in kw for k in ("user_A", "user_logit_bias")):
        kw["user_ids"] = None
    W = rnd(d_out, d_in, scale=d_in ** -0.5) if weight else None
    b = rnd(d_out) if bias else None
    return rnd(T, d_in), W, b, kw


def per_token_loop(x, W, b, expert_A=None, expert_B=None, expert_scale=1.0, router_weight=None,
                   user_ids=None, user_logit_bias=None, user_A=None, user_B=None, user_scale=1.0,
                   user_router=None, top_k=None, d_out=None):
    """DESIGN.md section 1 written token by token with float64 vectors (independent code)."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    x, W, b = f(x), f(W), f(b)
    A, B, Wr, C, Au, Bu, V = map(f, (expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    rows, gates = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        u = int(user_ids[t]) if user_ids is not None else -1
        y = torch.zeros(d_out, dtype=torch.float64)
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
                y += expert_scale * gt[k] * torch.mv(B[k], torch.mv(A[k], xt))
            gates.append(gt)
        if z is not None:
            y += user_scale * torch.mv(Bu[u], z)
        rows.append(y)
    return torch.stack(rows), (torch.stack(gates) if gates else None)


SIZES = [  # T, d_in, d_out, K, r, N, r_u
    (1, 8, 5, 3, 2, 4, 3),
    (19, 24, 17, 4, 3, 7, 5),
    (37, 33, 40, 1, 1, 5, 1),
    (64, 16, 16, 8, 4, 64, 4),
]


@pytest.mark.parametrize("law", POPULARITY_LAWS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_reference_matches_per_token_loop(law, size, top_k):
    T, d_in, d_out, K, r, N, r_u = size
    if top_k is not None and top_k > K:
        pytest.skip("top_k > K")
    x, W, b, kw = make_case(T, d_in, d_out, K, r, N, r_u, law=law, no_user_frac=0.2, seed=T + K)
    y_tok, g_tok = per_token_loop(x, W, b, top_k=top_k, d_out=d_out, **kw)
    for fn in (lora_mixture_ref, lora_mixture_ref_loop):
        y, g = fn(x, W, b, top_k=top_k, **kw)
        torch.testing.assert_close(y.double(), y_tok, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.double(), g_tok, rtol=1e-5, atol=1e-6)


SUBSETS = [(), ("experts",), ("experts", "router"), ("user_lora",), ("experts", "user_bias"),
           ("experts", "router", "user_lora"), PARTS]


@pytest.mark.parametrize("parts", SUBSETS)
@pytest.mark.parametrize("weight", [True, False])
def test_every_subset_of_parts(parts, weight):
    T, d_in, d_out = 13, 24, 10
    x, W, b, kw = make_case(T, d_in, d_out, 3, 2, 6, 3, parts=parts, weight=weight, no_user_frac=0.3)
    y_tok, g_tok = per_token_loop(x, W, b, d_out=d_out, **kw)
    y, g = pk.lora_mixture(x, W, b, return_gates=True, backend="reference", **kw)
    torch.testing.assert_close(y.double(), y_tok, rtol=1e-5, atol=1e-5)
    assert (g is None) == (g_tok is None)
    y2, _ = lora_mixture_ref_loop(x, W, b, d_out=d_out, **kw)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)


def test_uniform_gates_without_router_input():
    x, W, b, kw = make_case(9, 16, 8, 5, 2, 0, 0, parts=("experts",))
    _, g = pk.lora_mixture(x, W, b, return_gates=True, **kw)
    torch.testing.assert_close(g, torch.full((9, 5), 0.2))


def test_users_with_no_tokens_and_one_user_owning_all():
    x, W, b, kw = make_case(23, 16, 12, 3, 2, 50, 4, law="identical")
    assert kw["user_ids"].unique().numel() == 1  # 49 users without tokens
    y_tok, _ = per_token_loop(x, W, b, d_out=12, **kw)
    torch.testing.assert_close(lora_mixture_ref(x, W, b, **kw)[0].double(), y_tok, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    x, W, b, kw = make_case(31, 48, 40, 4, 4, 6, 4, dtype=dtype)
    y, g = lora_mixture_ref(x, W, b, **kw)
    assert y.dtype == dtype and g.dtype == torch.float32
    up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    y32, _ = lora_mixture_ref(x.float(), W.float(), b.float(), **up)
    # The only error left is the final rounding to the output dtype.
    eps = torch.finfo(dtype).eps
    assert (y.float() - y32).abs().max() <= eps * y32.abs().max() * 2


def test_leading_dims_and_empty_batch():
    x, W, b, kw = make_case(12, 16, 8, 3, 2, 4, 3)
    x3, ids3 = x.reshape(3, 4, 16), kw.pop("user_ids").reshape(3, 4)
    y3, g3 = pk.lora_mixture(x3, W, b, user_ids=ids3, return_gates=True, **kw)
    y2 = pk.lora_mixture(x, W, b, user_ids=ids3.reshape(12), **kw)
    assert y3.shape == (3, 4, 8) and g3.shape == (3, 4, 3)
    torch.testing.assert_close(y3.reshape(12, 8), y2)
    e = pk.lora_mixture(x[:0].reshape(0, 5, 16), W, b, user_ids=ids3[:0].reshape(0, 5), **kw)
    assert e.shape == (0, 5, 8)


def _gradcheck_case(parts, top_k=None):
    x, W, b, kw = make_case(7, 6, 5, 3, 2, 4, 2, parts=parts, dtype=torch.float64, no_user_frac=0.3, seed=3)
    names = [k for k, v in kw.items() if torch.is_tensor(v) and v.is_floating_point()]
    tensors = [x, W, b] + [kw[k] for k in names]

    def f(*ts):
        args = dict(kw, **dict(zip(names, ts[3:])))
        return pk.lora_mixture(ts[0], ts[1], ts[2], top_k=top_k, backend="reference", **args)

    return f, [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("parts,top_k", [(PARTS, None), (PARTS, 2), (("experts", "router"), None), (("user_lora",), None)])
def test_gradcheck_every_parameter(parts, top_k):
    f, inputs = _gradcheck_case(parts, top_k)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("law", ["distinct", "skewed"])
def test_rankspace_contract_matches_autograd(top_k, law):
    x, W, b, kw = make_case(17, 12, 9, 3, 2, 5, 3, law=law, dtype=torch.float64, no_user_frac=0.2)
    ids = kw.pop("user_ids")
    names = ["expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router"]
    P = {k: kw[k].clone().requires_grad_(True) for k in names}
    xr, Wr, br = (t.clone().requires_grad_(True) for t in (x, W, b))
    y_ref, g_ref = lora_mixture_ref(xr, Wr, br, user_ids=ids, top_k=top_k, expert_scale=0.7, user_scale=1.3, **P)
    dy = torch.randn_like(y_ref)
    auto = torch.autograd.grad(y_ref, [xr, Wr, br] + [P[k] for k in names], dy)
    y, h, z, g = mixture_fwd_ref(x, W, b, kw["expert_A"], kw["expert_B"], kw["router_weight"], ids,
                                 kw["user_logit_bias"], kw["user_A"], kw["user_B"], kw["user_router"],
                                 0.7, 1.3, top_k, 9)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(g, g_ref.detach())
    grads = mixture_bwd_ref(dy, x, h, z, g, W, kw["expert_A"], kw["expert_B"], kw["router_weight"], ids,
                            kw["user_A"], kw["user_B"], kw["user_router"], 0.7, 1.3, (True,) * 10)
    for name, a, m in zip(["x", "W", "b"] + names, auto, grads):
        torch.testing.assert_close(m, a, msg=name)


def test_balance_loss():
    K = 4
    assert balance_loss(torch.full((10, K), 1.0 / K)).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.zeros(10, K)
    collapsed[:, 0] = 1
    # importance = [10, 0, 0, 0]: var = 18.75, mean^2 = 6.25 -> cv^2 = 3 = K - 1
    assert balance_loss(collapsed).item() == pytest.approx(K - 1)
    mask = torch.zeros(10, dtype=torch.bool)
    assert balance_loss(collapsed, mask).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        balance_loss(collapsed, torch.ones(3, dtype=torch.bool))


def test_diversity_loss():
    eye = torch.eye(8)
    orth = torch.stack([eye[0:2], eye[2:4], eye[4:6]])  # orthogonal row spaces
    assert diversity_loss(orth).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.stack([eye[0:1]] * 3)
    assert diversity_loss(same).item() == pytest.approx(1.0)
    A = torch.randn(3, 2, 8, requires_grad=True)
    diversity_loss(A).backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()
    assert diversity_loss(torch.randn(1, 2, 8)).item() == 0.0


@pytest.mark.parametrize("law", ["zipf", "identical", "distinct"])
def test_segmented_user_products_match_gathered(law, monkeypatch):
    """Large batches take the per-segment path for the user terms: same results."""
    import proper_kernels.reference.mixture as ref

    x, W, b, kw = make_case(29, 20, 11, 3, 2, 6, 3, law=law, no_user_frac=0.2, dtype=torch.float64)
    kw = {k: (v.requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    y1, g1 = lora_mixture_ref(x, W, b, top_k=2, **kw)
    grads1 = torch.autograd.grad(y1.sum(), [kw["user_A"], kw["user_B"], kw["user_router"]])
    monkeypatch.setattr(ref, "_GATHER_LIMIT", 0)
    y2, g2 = lora_mixture_ref(x, W, b, top_k=2, **kw)
    grads2 = torch.autograd.grad(y2.sum(), [kw["user_A"], kw["user_B"], kw["user_router"]])
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(g2, g1)
    for a, c in zip(grads2, grads1):
        torch.testing.assert_close(a, c)


def test_empty_user_bank_all_ids_minus_one():
    """N = 0 users (every id -1): the user terms vanish, as in the kernels."""
    x, W, b, kw = make_case(6, 8, 5, 3, 2, 4, 3)
    for k in ("user_logit_bias", "user_A", "user_B", "user_router"):
        kw[k] = kw[k][:0]
    kw["user_ids"] = torch.full((6,), -1)
    bare = {k: v for k, v in kw.items() if k not in ("user_logit_bias", "user_A", "user_B", "user_router")}
    expected, g_exp = lora_mixture_ref(x, W, b, **bare)
    for fn in (lora_mixture_ref, lora_mixture_ref_loop):
        y, g = fn(x, W, b, **kw)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(g, g_exp)
    y = pk.lora_mixture(x, W, b, backend="reference", plan=pk.plan(kw["user_ids"], 0), **kw)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("fn", [lora_mixture_ref, lora_mixture_ref_loop])
@pytest.mark.parametrize("name", ["user_A", "user_logit_bias"])
def test_reference_user_tensors_need_ids(fn, name):
    """Both forms refuse user tensors without ids (no silent 'every token is user -1')."""
    x, W, b, kw = make_case(5, 8, 5, 3, 2, 4, 3)
    kw["user_ids"] = None
    if name == "user_logit_bias":
        kw["user_A"] = kw["user_B"] = kw["user_router"] = None
    with pytest.raises(ValueError, match="user_ids"):
        fn(x, W, b, **kw)


def test_users_without_tokens_get_exactly_zero_grads():
    x, W, b, kw = make_case(9, 6, 5, 3, 2, 6, 2, dtype=torch.float64)
    kw["user_ids"] = torch.tensor([0, 2, -1, 2, 0, 5, -1, 5, 0])
    names = ["user_logit_bias", "user_A", "user_B", "user_router"]
    for top_k in (None, 1, 2):
        P = {k: kw[k].clone().requires_grad_(True) for k in names}
        y, g = lora_mixture_ref(x, W, b, top_k=top_k, **dict(kw, **P))
        grads = torch.autograd.grad(y.square().sum() + balance_loss(g), [P[k] for k in names])
        for k, gr in zip(names, grads):
            assert gr[[1, 3, 4]].abs().max().item() == 0.0, k


def test_aux_losses_keep_float64_for_gradcheck():
    g = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1).requires_grad_()
    assert balance_loss(g).dtype == torch.float64
    assert torch.autograd.gradcheck(balance_loss, (g,))
    A = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert diversity_loss(A, B).dtype == torch.float64
    assert torch.autograd.gradcheck(diversity_loss, (A, B))
    assert balance_loss(g.detach().half()).dtype == torch.float32  # low precision still sums in fp32
