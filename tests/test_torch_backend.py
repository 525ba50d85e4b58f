"""The torch backend (proper_kernels/ops/torch_backend.py) against the reference, in
both variants: the forward and every gradient (through the gates too) by the one
tolerance rule (fp64 reference the oracle, fp32 reference the baseline), awkward
sizes and routings (every tile layout), 16-bit inputs, gradcheck, frozen inputs; the
variant rule; and the dispatch, which takes this backend by default on the CPU."""
import os

import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import mixture as mixture_op
from proper_kernels.ops import packs, torch_routing, torch_wide
from proper_kernels.ops import torch_backend as tb
from proper_kernels.ops.plan import RoutingPlan
from proper_kernels.reference import ADAPTER_TENSORS, Adapters, lora_mixture_ref
from proper_kernels.testing import assert_close, at_fp64_and_fp32, mixture_case

pytestmark = pytest.mark.usefixtures("torch_one_thread")

NAMES = ("x", "weight", "bias") + ADAPTER_TENSORS


def reference_op(c):
    return lambda x, w, b, a, ids: lora_mixture_ref(x, w, b, a, ids, d_out=c.d_out)


def torch_op(c, variant, plan=None):
    return lambda x, w, b, a, ids: tb.lora_mixture_torch(x, w, b, a, ids, d_out=c.d_out, num_users=c.N,
                                                         plan=plan, variant=variant)


def outputs_and_grads(op, x, w, b, adapters, ids, seed=3):
    """{name: tensor} of y, the gates and the gradient of every tensor present, for
    the loss <y, dy> + <gates, dg> (dg: the gates' own gradient, as a balance loss
    gives)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b) + adapters.tensors()]
    a = adapters._replace(**dict(zip(ADAPTER_TENSORS, leaves[3:])))
    y, g = op(*leaves[:3], a, ids)
    gen = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    out = {"y": y}
    if g is not None:
        loss = loss + (g.double() * torch.randn(g.shape, generator=gen, dtype=torch.float64)).sum()
        out["gates"] = g
    present = [(n, t) for n, t in zip(NAMES, leaves) if t is not None]
    grads = torch.autograd.grad(loss, [t for _, t in present], allow_unused=True)
    for (n, t), gr in zip(present, grads):
        out["d" + n] = gr if gr is not None else torch.zeros_like(t)
    return out


def check_against_reference(c, op, dtype=None):
    ref64, ref32 = at_fp64_and_fp32(lambda *t: outputs_and_grads(reference_op(c), *t, c.user_ids),
                                    c.x, c.weight, c.bias, c.adapters)
    out = outputs_and_grads(op, c.x, c.weight, c.bias, c.adapters, c.user_ids)
    assert out.keys() == ref64.keys()
    for name, o in out.items():
        assert o.dtype == (ref32[name].dtype if name == "gates" else c.x.dtype if name in ("y", "dx") else
                           {"d" + n: t.dtype for n, t in zip(NAMES[1:], (c.weight, c.bias) + c.adapters.tensors())
                            if t is not None}[name]), name
        assert_close(name, o, ref64[name], ref32[name], dtype=None if name == "gates" else dtype)


# name: mixture_case arguments. One user owning the batch, a single user beside tokens
# without one, one token per user (a tile per user of the bank), a skewed batch (runs
# cut at the mean run), zipf, no user at all; parts left out one at a time.
CASES = {
    "primes": dict(T=37, d_in=19, d_out=23, K=3, r=5, r_u=3, N=7),
    "T=1": dict(T=1, d_in=16, d_out=8, no_user=0.0),
    "T=1-no-user": dict(T=1, d_in=16, d_out=8, no_user=1.0),
    "one-user": dict(T=20, d_in=17, d_out=9, law="identical", no_user=0.0),
    "one-user-and-no-user": dict(T=20, d_in=17, d_out=9, law="identical", no_user=0.4),
    "all-no-user": dict(T=13, d_in=16, d_out=8, no_user=1.0),
    "distinct": dict(T=5, d_in=16, d_out=8, N=5, law="distinct", no_user=0.0),
    "skewed": dict(T=61, d_in=16, d_out=8, N=9, law="skewed", no_user=0.1),
    "zipf": dict(T=47, d_in=18, d_out=11, N=6, law="zipf", no_user=0.0),
    "top_k": dict(T=29, d_in=16, d_out=8, K=4, top_k=2),
    "no-weight": dict(T=11, d_in=16, d_out=8, weight=False),
    "no-bias-router": dict(T=11, d_in=16, d_out=8, bias=False, router=False),
    "no-experts": dict(T=11, d_in=16, d_out=8, K=0),
    "user-bias-only": dict(T=23, d_in=16, d_out=8, r_u=0),
    "one-user-bias-only": dict(T=7, d_in=16, d_out=8, r_u=0, law="identical", no_user=0.0),
    "one-user-no-experts": dict(T=7, d_in=16, d_out=8, K=0, law="identical", no_user=0.0),
    "no-user-router-bias": dict(T=23, d_in=16, d_out=8, user_router=False, user_bias=False),
    # the user bias without the LoRA-aware router, every token with a user (an expanded c per tile)
    "user-bias-no-user-router": dict(T=23, d_in=16, d_out=8, user_router=False, no_user=0.0),
    "user-bias-no-user-router-full-tiles": dict(T=16, d_in=16, d_out=8, N=4, law="punica-uniform", user_router=False,
                                                no_user=0.0),
    # the LoRA-aware router alone makes the logits (no W_r, no c)
    "user-router-only": dict(T=19, d_in=16, d_out=8, router=False, user_bias=False),
    "one-user-user-router-only": dict(T=9, d_in=16, d_out=8, router=False, user_bias=False, law="identical",
                                      no_user=0.0),
    "N=0": dict(T=9, d_in=16, d_out=8, N=0),
    "T=0": dict(T=0, d_in=16, d_out=8),
}


@pytest.mark.parametrize("variant", tb.VARIANTS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, variant):
    c = mixture_case(**CASES[name])
    check_against_reference(c, torch_op(c, variant))


@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_empty_bank(variant):
    """N = 0 users in the bank (every id -1): the user terms vanish, their gradients are
    empty tensors of the bank's shape."""
    c = mixture_case(7, 16, 8, K=3, r=2, r_u=3, N=4, no_user=1.0)
    empty = {k: getattr(c.adapters, k)[:0] for k in ("user_logit_bias", "user_A", "user_B", "user_router")}
    c = c._replace(adapters=c.adapters._replace(**empty), N=0)
    check_against_reference(c, torch_op(c, variant))


@pytest.mark.parametrize("variant", tb.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(variant, dtype):
    """16-bit x and parameters: computed in fp32, y and every gradient rounded to its
    tensor's dtype (the gates stay fp32), within the tolerance of that dtype."""
    c = mixture_case(29, 24, 20, K=3, r=4, r_u=4, N=5, law="zipf").to(dtype)
    check_against_reference(c, torch_op(c, variant), dtype=dtype)


@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_gradcheck(variant):
    c = mixture_case(6, 5, 4, K=2, r=2, r_u=2, N=3, dtype=torch.float64, law="zipf")
    inputs = [t.detach().clone().requires_grad_() for t in (c.x, c.weight, c.bias) + c.adapters.tensors()]

    def fn(x, w, b, *tensors):
        return tb.lora_mixture_torch(x, w, b, Adapters.from_flat(tensors, 0.7, 1.3), c.user_ids, d_out=4,
                                     num_users=3, variant=variant)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_frozen_inputs_and_unused_outputs(variant):
    """Only some tensors require grad: only they get one. A loss of the gates alone or
    of y alone back-propagates too."""
    c = mixture_case(17, 16, 8, K=3, r=2, r_u=3, N=4)
    A_u = c.adapters.user_A.clone().requires_grad_()
    V = c.adapters.user_router.clone().requires_grad_()
    a = c.adapters._replace(user_A=A_u, user_router=V)
    y, g = torch_op(c, variant)(c.x, c.weight, c.bias, a, c.user_ids)
    (dA_gates,) = torch.autograd.grad(g.square().sum(), [A_u], retain_graph=True)
    yr, gr = lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)
    (ref,) = torch.autograd.grad(gr.square().sum(), [A_u], retain_graph=True)
    torch.testing.assert_close(dA_gates, ref)
    dA, dV = torch.autograd.grad(y.sum(), [A_u, V])
    for got, want in zip((dA, dV), torch.autograd.grad(yr.sum(), [A_u, V])):
        torch.testing.assert_close(got, want)


def test_non_contiguous_x_and_routing_reused_per_plan():
    c = mixture_case(12, 16, 8, K=3, r=2, r_u=3, N=4, law="uniform")
    x = c.x.t().contiguous().t()
    assert not x.is_contiguous()
    plan = RoutingPlan(c.user_ids, 4)
    y, _ = tb.lora_mixture_torch(x, c.weight, c.bias, c.adapters, plan.user_ids, d_out=8, num_users=4, plan=plan,
                                 variant="segment")
    torch.testing.assert_close(y, lora_mixture_ref(c.x, c.weight, c.bias, c.adapters, c.user_ids)[0])
    # The tiles of a plan are built once, for every layer of the batch.
    assert torch_routing._routing("segment", plan.user_ids, plan, 4, 3) is torch_routing._routing("segment", plan.user_ids, plan, 4, 3)


def _layout(ids, N, r_u=2):
    ids = torch.tensor(ids)
    return torch_routing._routing("segment", ids, RoutingPlan(ids, N), N, r_u)


def test_tile_layouts():
    """One user owning the batch: no tiles. Otherwise the layout moving the fewest rows:
    one tile per user of the bank (read in place), per active user, or the runs cut."""
    one = _layout([2, 2, 2], 4)
    assert one.user == 2 and one.G == 0 and one.rows is None
    assert _layout([-1, -1], 4).G == 0 and _layout([-1, -1], 4).user == -1
    bank = _layout([3, 0, 1, 2], 4)  # a token per user: N tiles of one row, nothing to mask
    assert (bank.G, bank.L, bank.users, bank.mask) == (4, 1, None, None)
    assert bank.rows.tolist() == [1, 2, 3, 0]
    active = _layout([0, 0, -1, 5, 5], 8)  # 2 of 8 users: their weights gathered
    assert (active.G, active.L) == (2, 2) and active.users.tolist() == [0, 5] and active.mask is None
    split = _layout([1] * 20 + [2, 3, 4], 5)  # a long run cut at the mean run, ceil(23 / 4) = 6 rows
    assert (split.G, split.L) == (7, 6) and split.users.tolist() == [1, 1, 1, 1, 2, 3, 4]
    assert split.mask.view(7, 6).sum(1).tolist() == [6, 6, 6, 2, 1, 1, 1]


def test_choose_variant():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tb.choose_variant(None, 0, 3, cpu) == ("wide", "no user terms")
    assert tb.choose_variant(8, 4, 2, cpu)[0] == "wide"  # N (r_u + K) = 48 <= CPU_WIDE_MAX_RANK
    assert tb.choose_variant(tb.CPU_WIDE_MAX_RANK // 6 + 1, 4, 2, cpu)[0] == "segment"
    assert tb.choose_variant(8, 4, 2, cuda)[0] == "wide"
    assert tb.choose_variant(8, 4, 2, cpu, traced=True) == ("wide", "traced by torch.compile: no host sync")
    assert tb.choose_variant(tb.WIDE_MAX_RANK, 4, 2, cuda)[0] == "segment"
    with pytest.raises(ValueError, match="variant must be one of"):
        tb.lora_mixture_torch(torch.ones(1, 2), torch.ones(3, 2), None, Adapters(), None, d_out=3, variant="loop")


def test_auto_on_cpu_is_the_torch_backend(monkeypatch):
    """Without a kernel that can run (CPU, no TRITON_INTERPRET), auto takes the torch
    backend, says why, and lora_mixture runs it in the variant the path names."""
    monkeypatch.delenv("PROPER_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = mixture_case(10, 16, 8, K=3, r=2, r_u=3, N=4)
    path = pk.explain(c.x, c.weight, c.bias, **c.kwargs())
    kernels = "; the CPU kernels run its user terms per token" if tb._cpu_kernels() else ""
    assert path == pk.Path("torch", "auto", "no Triton: x is a CPU tensor and TRITON_INTERPRET=1 is not set: the "
                           f"torch backend, wide variant (a small bank on the CPU: N (r_u + K) = 24 <= "
                           f"{tb.CPU_WIDE_MAX_RANK}{kernels})", "wide")
    calls = []
    real = mixture_op.lora_mixture_torch
    monkeypatch.setattr(mixture_op, "lora_mixture_torch", lambda *a, **k: calls.append(k["variant"]) or real(*a, **k))
    for backend in (None, "torch"):
        y, g = pk.lora_mixture(c.x, c.weight, c.bias, return_gates=True, backend=backend, **c.kwargs())
        yr, gr = lora_mixture_ref(c.x, c.weight, c.bias, c.adapters, c.user_ids)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(g, gr)
    assert calls == ["wide", "wide"]


def test_torch_compile_takes_the_wide_variant(monkeypatch):
    """Traced by torch.compile (with the batch's plan, as the layers pass it) the
    dispatch takes wide, which needs no host sync: one graph, the segment tiles never
    built; the same values as eager, gradients included."""
    c = mixture_case(10, 16, 8, K=3, r=2, r_u=3, N=4)
    plan = pk.plan(c.user_ids, 4)
    A_u = c.adapters.user_A.clone().requires_grad_()
    kw = dict(c.kwargs(), user_A=A_u, plan=plan)

    def f(x):
        return pk.lora_mixture(x, c.weight, c.bias, backend="torch", **kw)

    yr = f(c.x)
    (dAr,) = torch.autograd.grad(yr.sum(), [A_u])
    monkeypatch.setattr(torch_routing, "_segment_routing", None)
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(c.x)
    (dA,) = torch.autograd.grad(y.sum(), [A_u])
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(dA, dAr)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_cuda_matches_reference(variant):
    c = mixture_case(77, 48, 40, K=4, r=4, r_u=4, N=9, law="zipf", device="cuda")
    check_against_reference(c, torch_op(c, variant))


# ---- the CPU kernels of the wide variant, the packed weights, the one-user rows ----------
@pytest.fixture
def torch_ops_only(monkeypatch):
    """The wide variant's per-token work as torch ops, as where the CPU kernels are not built."""
    monkeypatch.setattr(torch_wide, "_CPU_KERNELS", False)


@pytest.mark.parametrize("name", list(CASES))
def test_wide_without_the_cpu_kernels_matches_reference(name, torch_ops_only):
    c = mixture_case(**CASES[name])
    check_against_reference(c, torch_op(c, "wide"))


def test_cpu_kernels_are_built():
    """pip install -e . builds proper_kernels._cpu (python/build_cpu.py) wherever torch's
    headers and a C++ compiler are, as on CI; the wide variant then runs them."""
    for var in ("PROPER_KERNELS_SKIP_CPU_BUILD", "PROPER_KERNELS_CPU_KERNELS"):
        if os.environ.get(var) == ("0" if var.endswith("KERNELS") else "1"):
            pytest.skip(f"{var}={os.environ[var]}")
    assert tb._cpu_kernels(), "proper_kernels._cpu is not built: pip install --no-build-isolation -e ."


@pytest.mark.skipif(not tb._cpu_kernels(), reason="proper_kernels._cpu not built")
def test_cpu_kernels_run_and_reject_bad_ids(monkeypatch):
    c = mixture_case(11, 16, 8, K=3, r=2, r_u=3, N=4, top_k=2)
    calls = []
    for name in ("wide_layer", "wide_layer_forward"):
        op = getattr(torch.ops.proper_kernels_cpu, name)
        monkeypatch.setattr(torch.ops.proper_kernels_cpu, name, lambda *a, op=op, name=name: calls.append(name) or op(*a))
    check_against_reference(c, torch_op(c, "wide"))  # with gradients: the kernels' own autograd node
    assert set(calls) == {"wide_layer"}
    with torch.no_grad():
        torch_op(c, "wide")(c.x, c.weight, c.bias, c.adapters, c.user_ids)
    assert calls[-1] == "wide_layer_forward"
    real = torch.ops.proper_kernels_cpu.wide_layer_forward
    x, Au, Bu = torch.zeros(2, 5), torch.zeros(4, 3, 5), torch.zeros(4, 6, 3)
    ids = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 4 is outside \[-1, 4\)"):
        real(x, None, None, None, None, Au, Bu, ids, None, None, 0, 0, 3, 4, 6, False, 0, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="B_u must have shape"):
        real(x, None, None, None, None, Au, Bu[1:], ids.clamp(max=3), None, None, 0, 0, 3, 4, 6, False, 0, 1.0, 1.0, False)


def _count_packs(monkeypatch):
    """Calls of the pack builders (the CPU kernels' and the torch ops')."""
    calls = []
    real = torch_wide._wide_weights
    monkeypatch.setattr(torch_wide, "_wide_weights", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(torch_wide, "_KERNEL_BUILDERS", {key: (lambda *a, f=f: calls.append(1) or f(*a))
                                                         for key, f in torch_wide._KERNEL_BUILDERS.items()})
    return calls


def test_packed_weights_follow_every_change(monkeypatch):
    """Frozen adapters are packed once and repacked after any change the version
    counter or the storage shows: in-place writes, another tensor, a new shape. Writes
    through .data bypass the counter: clear_pack_cache() is the remedy."""
    c = mixture_case(9, 16, 8, K=3, r=2, r_u=3, N=4)
    a = c.adapters._replace(**{k: getattr(c.adapters, k).clone() for k in ADAPTER_TENSORS})
    calls = _count_packs(monkeypatch)

    def check():
        y, _ = torch_op(c, "wide")(c.x, c.weight, c.bias, a, c.user_ids)
        torch.testing.assert_close(y, lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)[0])

    check(), check()
    assert len(calls) == 1
    with torch.no_grad():
        a.user_B[2].mul_(3.0)  # a view's write bumps the base's version
    check()
    assert len(calls) == 2
    a = a._replace(expert_B=a.expert_B.clone() * 0.5)
    check()
    assert len(calls) == 3
    a.user_B.data.add_(1.0)  # invisible to the counter...
    y, _ = torch_op(c, "wide")(c.x, c.weight, c.bias, a, c.user_ids)
    assert len(calls) == 3
    assert not torch.allclose(y, lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)[0])
    tb.clear_pack_cache()  # ...until the cache is cleared
    check()
    assert len(calls) == 4


def test_trainable_adapters_are_packed_every_call(monkeypatch):
    """Tensors that require grad change at every step: packed once per forward (and
    reused by its backward), never kept. Without the cache every call packs."""
    c = mixture_case(9, 16, 8, K=3, r=2, r_u=3, N=4)
    calls = _count_packs(monkeypatch)
    A = c.adapters.user_A.clone().requires_grad_()
    a = c.adapters._replace(user_A=A)
    for _ in range(2):
        y, _ = torch_op(c, "wide")(c.x, c.weight, c.bias, a, c.user_ids)
        torch.autograd.grad(y.sum(), [A])
    assert len(calls) == 2
    monkeypatch.setattr(packs, "_PACK_CACHE", False)
    for _ in range(2):
        torch_op(c, "wide")(c.x, c.weight, c.bias, c.adapters, c.user_ids)
    assert len(calls) == 4


@pytest.mark.parametrize("T, one_user", [(1, False), (200, True)])
def test_one_user_rows_when_wide_would_waste(T, one_user):
    """On the CPU one user owning a batch runs as plain GEMMs over its own rows once
    wide would multiply ONE_USER_MIN_WASTE zeros; a small batch stays wide."""
    c = mixture_case(T, 64, 48, K=3, r=4, r_u=8, N=64, law="identical", no_user=0.0)
    assert (T * 63 * 8 * (64 + 48) >= tb.ONE_USER_MIN_WASTE) == one_user
    plan = pk.plan(c.user_ids, 64)
    rt = torch_routing._routing("wide", plan.user_ids, plan, 64, 8, 64 + 48)
    assert (rt.user >= 0) == one_user and rt.wide != one_user
    check_against_reference(c, torch_op(c, "wide", plan))


@pytest.mark.parametrize("grad", [False, True])
def test_wide_takes_non_contiguous_x(grad):
    """A strided x (a transposed copy, a column slice) runs, with and without gradients."""
    c = mixture_case(12, 16, 8, K=3, r=2, r_u=3, N=4)
    x = torch.cat([c.x, c.x], 1)[:, :16]
    assert not x.is_contiguous()
    if grad:
        x = x.detach().requires_grad_()
    y = pk.lora_mixture(x, c.weight, c.bias, backend="torch", **c.kwargs())
    torch.testing.assert_close(y, lora_mixture_ref(c.x, c.weight, c.bias, c.adapters, c.user_ids)[0])
    if grad:
        (dx,) = torch.autograd.grad(y.sum(), [x])
        xr = c.x.clone().requires_grad_()
        (dxr,) = torch.autograd.grad(lora_mixture_ref(xr, c.weight, c.bias, c.adapters, c.user_ids)[0].sum(), [xr])
        torch.testing.assert_close(dx, dxr)


def test_no_silent_second_derivative():
    """The torch backend differentiates once: asking a second derivative raises (the
    CPU kernels' node refuses create_graph=True, the torch ops' a second backward)
    instead of returning a wrong one."""
    c = mixture_case(9, 16, 8, K=3, r=2, r_u=3, N=4)
    x = c.x.clone().requires_grad_()
    y = pk.lora_mixture(x, c.weight, c.bias, backend="torch", **c.kwargs())
    with pytest.raises(RuntimeError, match="differentiate"):
        (dx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        torch.autograd.grad(dx.square().sum(), [x])


def test_packed_weights_tell_views_and_positions_apart():
    """Another view of the same memory (same address and shape, other strides) or the
    same tensor in another argument is another pack."""
    c = mixture_case(9, 16, 8, K=3, r=2, r_u=3, N=4)  # K == r_u: V and its transpose share a shape
    V = c.adapters.user_router.clone()
    for router in (V, V.transpose(1, 2)):
        a = c.adapters._replace(user_router=router)
        y = pk.lora_mixture(c.x, c.weight, c.bias, backend="torch", **dict(c.kwargs(), user_router=router))
        torch.testing.assert_close(y, lora_mixture_ref(c.x, c.weight, c.bias, a, c.user_ids)[0])


@pytest.mark.skipif(not tb._cpu_kernels(), reason="proper_kernels._cpu not built")
def test_cpu_kernel_backward_checks_its_inputs():
    c = mixture_case(6, 8, 5, K=2, r=2, r_u=3, N=3)
    k = torch_wide._kernel_pack(c.adapters, torch.float32)
    ids = c.user_ids.to(torch.int32)
    fwd = torch.ops.proper_kernels_cpu.wide_layer_forward(c.x, c.weight, c.bias, k.Sg, k.Eg, k.Au, k.Bu, ids, k.c, k.V,
                                                          2, 2, 3, 3, 5, True, 0, 1.0, 1.0, False)
    _, Hg, HGg, Z, G = fwd
    for dy, H in ((torch.ones(1, 5), Hg), (torch.ones(6, 5), Hg[:1])):
        with pytest.raises(RuntimeError, match="must have shape"):
            torch.ops.proper_kernels_cpu.wide_layer_backward(dy, c.x, c.weight, k.Sg, k.Eg, k.Au, k.Bu, H, HGg, Z, G,
                                                             None, ids, k.V, 2, 2, 3, 3, True, 1.0, 1.0, True, True,
                                                             True, True, True, True, True)
