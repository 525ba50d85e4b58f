"""Tests of the fused Triton backward (proper_kernels/triton/mixture_bwd.py).

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before the kernels are *defined* (triton.jit reads it
at decoration). tests/conftest.py sets it; this module also sets it (setdefault)
before importing triton, so it works alone too. If the kernel module was already
imported without the interpreter and there is no GPU, the module is skipped. The
interpreter's tl.dot is wrong for bf16, so interpreter tests use fp32 / fp16 / fp64;
bf16 runs in the GPU tests (skipped without CUDA).

Checked: every gradient of the launcher against the rank-space contract
``mixture_bwd_ref`` and against autograd of ``lora_mixture_ref``, over popularity
laws and awkward sizes; frozen subsets (``needs``); determinism; fp64 gradcheck of a
reference forward + Triton backward and of the whole op; optimizer steps of a tiny
model with backend="triton" vs backend="reference"; the per-user reductions' split
over tokens (a small SPLIT_T forced through the config) against an fp64 oracle,
bitwise run to run, and which passes run.
"""
import functools
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import skip_if_interpreter_broken  # noqa: E402

triton = pytest.importorskip("triton")
skip_if_interpreter_broken()

import proper_kernels  # noqa: E402
from proper_kernels.ops.plan import RoutingPlan  # noqa: E402
from proper_kernels.reference.mixture import lora_mixture_ref  # noqa: E402
from proper_kernels.reference.rankspace import mixture_bwd_ref, mixture_fwd_ref  # noqa: E402
from proper_kernels.triton import mixture_bwd as MB  # noqa: E402

try:
    from triton.runtime.interpreter import InterpretedFunction

    INTERP = isinstance(MB._mixture_bwd_rank_kernel, InterpretedFunction)
except ImportError:  # pragma: no cover
    INTERP = False

if not INTERP and not _CUDA:
    pytest.skip("proper_kernels.triton.mixture_bwd was imported without TRITON_INTERPRET=1 and there is "
                "no CUDA device: run this module with TRITON_INTERPRET=1", allow_module_level=True)

interp = pytest.mark.skipif(not INTERP, reason="interpreter tests (CPU tensors) need TRITON_INTERPRET=1")

NAMES = ("dx", "dW0", "db", "dA_g", "dB_g", "dW_r", "dc", "dA_u", "dB_u", "dV")
LAWS = ("distinct", "uniform", "zipf", "identical", "skewed")


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    # The op routes to the kernels only when TRITON_INTERPRET=1 at call time (on CPU).
    if INTERP:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ----------------------------------------------------------------------------- inputs


def user_ids_by_law(T, N, law, gen, no_user=0.0):
    """Punica's popularity laws; a fraction ``no_user`` of the tokens gets id -1."""
    if law == "distinct":
        ids = torch.arange(T) % N
    elif law == "uniform":
        ids = torch.randint(0, N, (T,), generator=gen)
    elif law == "zipf":
        p = torch.arange(1, N + 1, dtype=torch.float64).pow(-1.5)
        ids = torch.randperm(N, generator=gen)[torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)]
    elif law == "identical":
        ids = torch.full((T,), int(torch.randint(0, N, (1,), generator=gen)))
    else:  # skewed: half the tokens one user, the rest uniform
        hot = int(torch.randint(0, N, (1,), generator=gen))
        ids = torch.randint(0, N, (T,), generator=gen)
        ids[torch.randperm(T, generator=gen)[: (T + 1) // 2]] = hot
    if no_user:
        ids[torch.rand(T, generator=gen) < no_user] = -1
    return ids.long()


def make_inputs(T, d_in, d_out, K, r, r_u, N, law="uniform", no_user=0.2, dtype=torch.float32, seed=0,
                weight=True, router=True, user_bias=True, user_router=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    p = dict(x=rnd(T, d_in), weight=rnd(d_out, d_in, std=d_in ** -0.5) if weight else None,
             expert_A=None, expert_B=None, router_weight=None, user_logit_bias=None,
             user_A=None, user_B=None, user_router=None, user_ids=None, expert_scale=1.5, user_scale=0.75)
    if K:
        p["expert_A"] = rnd(K, r, d_in, std=d_in ** -0.5)
        p["expert_B"] = rnd(K, d_out, r, std=0.5 * r ** -0.5)
        if router:
            p["router_weight"] = rnd(K, d_in, std=2 * d_in ** -0.5)
        if user_bias and N:
            p["user_logit_bias"] = rnd(N, K)
    if r_u:
        p["user_A"] = rnd(N, r_u, d_in, std=d_in ** -0.5)
        p["user_B"] = rnd(N, d_out, r_u, std=0.5 * r_u ** -0.5)
        if K and user_router:
            p["user_router"] = rnd(N, K, r_u, std=r_u ** -0.5)
    if N:
        p["user_ids"] = user_ids_by_law(T, N, law, gen, no_user)
    p["dy"] = rnd(T, d_out)
    return p


def _plan(p, N):
    if p["user_ids"] is None or not any(p[k] is not None for k in ("user_logit_bias", "user_A", "user_router")):
        return None, None, None
    pl = RoutingPlan(p["user_ids"], N)
    return pl.user_ids, pl.order, pl.seg_offsets


def run_launcher(p, N, top_k, needs, dx_dtype=None):
    """(h, z, g) from the reference forward, then the Triton launcher and the contract."""
    d_out = p["dy"].shape[1]
    _, h, z, g = mixture_fwd_ref(p["x"], p["weight"], None, p["expert_A"], p["expert_B"], p["router_weight"],
                                 p["user_ids"], p["user_logit_bias"], p["user_A"], p["user_B"], p["user_router"],
                                 p["expert_scale"], p["user_scale"], top_k, d_out)
    uid, order, seg = _plan(p, N)
    args = (p["dy"], p["x"], h, z, g, p["weight"], p["expert_A"], p["expert_B"], p["router_weight"])
    tail = (p["expert_scale"], p["user_scale"], tuple(needs))
    out = MB.mixture_bwd(*args, uid, order, seg, p["user_A"], p["user_B"], p["user_router"], *tail,
                         dx_dtype=dx_dtype)
    ref = mixture_bwd_ref(*args, p["user_ids"], p["user_A"], p["user_B"], p["user_router"], *tail)
    return out, ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


# fp32: the kernels and the reference differ only in summation order, so the error is
# a few ulps of the largest gradient entry times sqrt(reduction depth): 2e-5 relative
# to the max covers depths of a few hundred. fp16: the kernels round the rank-space
# codes (dh, dl, dz) and dy W0 to fp16 before the tensor-core dots, as torch.autocast
# would, while the reference works in fp32 from the same fp16 inputs. One fp16 rounding
# is 4.9e-4 relative; 5e-3 (about ten roundings' worth) still catches any wrong term,
# whose error is O(1) relative.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.float64: 1e-11}

# name: (T, d_in, d_out, K, r, r_u, N, law, top_k, no_user fraction, extra make_inputs kwargs)
CASES = {
    "uniform": (37, 40, 24, 3, 5, 6, 5, "uniform", None, 0.2, {}),
    "distinct_empty_users_topk": (19, 33, 17, 4, 4, 8, 23, "distinct", 2, 0.0, {}),
    "zipf_r1": (61, 16, 48, 2, 1, 3, 7, "zipf", None, 0.1, {}),
    "identical_T1_K1": (1, 24, 20, 1, 2, 2, 3, "identical", None, 0.0, {}),
    "skewed_top1_d111": (53, 111, 29, 5, 3, 7, 6, "skewed", 1, 0.3, {}),
    "prime_rank_mismatch": (97, 31, 37, 3, 7, 16, 11, "uniform", None, 0.25, {}),
    "no_experts": (29, 20, 18, 0, 0, 5, 4, "zipf", None, 0.2, {}),
    "no_users": (41, 26, 22, 4, 3, 0, 0, "uniform", None, 0.0, {}),
    "all_no_user": (13, 18, 14, 3, 2, 4, 3, "uniform", None, 1.0, {}),
    "no_weight_no_router": (23, 19, 21, 3, 4, 5, 4, "skewed", None, 0.2, dict(weight=False, router=False)),
    "experts_only_uniform_gates": (17, 22, 15, 3, 2, 0, 0, "uniform", None, 0.0,
                                   dict(router=False, user_bias=False)),
    "user_bias_no_vrouter": (31, 21, 19, 4, 2, 3, 5, "zipf", 3, 0.1, dict(user_router=False)),
}


def _case(name, dtype, seed=0):
    T, d_in, d_out, K, r, r_u, N, law, top_k, no_user, kw = CASES[name]
    p = make_inputs(T, d_in, d_out, K, r, r_u, N, law, no_user, dtype=dtype, seed=seed, **kw)
    return p, N, top_k


def _applies(p):
    has_e = p["expert_A"] is not None
    return (True, p["weight"] is not None, True, has_e, has_e, p["router_weight"] is not None,
            has_e and p["user_logit_bias"] is not None, p["user_A"] is not None, p["user_B"] is not None,
            p["user_router"] is not None)


def _check(out, ref, needs, p, tol, tag=""):
    for name, a, b, need, applies in zip(NAMES, out, ref, needs, _applies(p)):
        if not need:
            assert a is None, f"{tag}{name} computed though not needed"
            continue
        if name == "dc" and p["user_logit_bias"] is None:
            continue  # the launcher does not know whether the bias exists; nobody asks then
        if not applies:
            assert a is None or a.numel() == 0 or b is None, f"{tag}{name}"
            continue
        assert a is not None and b is not None, f"{tag}{name} missing"
        assert a.shape == b.shape, f"{tag}{name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{tag}{name} not finite"
        e = rel_err(a, b)
        assert e <= tol, f"{tag}{name}: relative error {e:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- vs contract


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_launcher_matches_contract(name, dtype):
    p, N, top_k = _case(name, dtype)
    needs = _applies(p)
    out, ref = run_launcher(p, N, top_k, needs)
    _check(out, ref, needs, p, TOL[dtype], f"[{name} {dtype}] ")
    if needs[0]:
        assert out[0].dtype == torch.float32


@interp
@pytest.mark.parametrize("law", LAWS)
def test_popularity_laws(law):
    p = make_inputs(45, 24, 20, 3, 4, 4, 9, law, 0.15, seed=3)
    needs = _applies(p)
    out, ref = run_launcher(p, 9, 2 if law == "zipf" else None, needs)
    _check(out, ref, needs, p, TOL[torch.float32], f"[{law}] ")


@interp
def test_dx_in_input_dtype():
    p, N, top_k = _case("uniform", torch.float16)
    needs = _applies(p)
    out, ref = run_launcher(p, N, top_k, needs, dx_dtype=torch.float16)
    assert out[0].dtype == torch.float16
    assert rel_err(out[0], ref[0]) <= 2 * TOL[torch.float16]


@functools.lru_cache(maxsize=1)
def _full_prime():
    p, N, top_k = _case("prime_rank_mismatch", torch.float32)
    return run_launcher(p, N, top_k, (True,) * 10)[0]


@interp
@pytest.mark.parametrize("subset", range(8))
def test_frozen_subsets(subset):
    """Each subset of needs: the others are None, the rest equal the full result."""
    p, N, top_k = _case("prime_rank_mismatch", torch.float32)
    full = _full_prime()
    gen = torch.Generator().manual_seed(100 + subset)
    if subset < 3:  # stage-shaped subsets: group stage, user stage, only dx
        needs = [(1, 0, 0, 1, 1, 1, 1, 0, 0, 0), (1, 0, 0, 0, 0, 0, 1, 1, 1, 1), (1,) + (0,) * 9][subset]
    else:
        needs = tuple(int(b) for b in (torch.rand(10, generator=gen) < 0.4).tolist())
    needs = tuple(bool(b) for b in needs)
    out, _ = run_launcher(p, N, top_k, needs)
    for name, a, f, need in zip(NAMES, out, full, needs):
        if not need:
            assert a is None, name
        else:
            assert torch.allclose(a, f, rtol=0, atol=1e-6 * f.abs().max().item() + 1e-12), name


@interp
def test_nothing_needed():
    p, N, top_k = _case("uniform", torch.float32)
    out, _ = run_launcher(p, N, top_k, (False,) * 10)
    assert all(o is None for o in out)


@interp
def test_deterministic():
    p, N, top_k = _case("skewed_top1_d111", torch.float32)
    a, _ = run_launcher(p, N, top_k, (True,) * 10)
    b, _ = run_launcher(p, N, top_k, (True,) * 10)
    for name, x, y in zip(NAMES, a, b):
        assert (x is None and y is None) or torch.equal(x, y), name


@interp
@pytest.mark.parametrize("name", ["uniform", "distinct_empty_users_topk", "no_experts", "no_users"])
def test_launcher_matches_autograd(name):
    """Against autograd of the vectorised oracle (not only the rank-space contract)."""
    p, N, top_k = _case(name, torch.float32)
    keys = ("x", "weight", "expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B",
            "user_router")
    leaves = {k: p[k].clone().requires_grad_(True) for k in keys if p[k] is not None}
    kw = {k: leaves.get(k) for k in keys if k not in ("x", "weight")}
    y, _ = lora_mixture_ref(leaves["x"], leaves.get("weight"), None, user_ids=p["user_ids"], top_k=top_k,
                            expert_scale=p["expert_scale"], user_scale=p["user_scale"], **kw)
    y.backward(p["dy"])
    needs = _applies(p)
    out, _ = run_launcher(p, N, top_k, needs)
    grads = dict(zip(NAMES, out))
    for name, key in zip(NAMES, ("x", "weight", None, "expert_A", "expert_B", "router_weight", "user_logit_bias",
                                 "user_A", "user_B", "user_router")):
        if key is None or key not in leaves:
            continue
        e = rel_err(grads[name], leaves[key].grad)
        assert e <= TOL[torch.float32], f"{name}: {e:.3g}"


# ----------------------------------------------------------------------------- gradcheck


class _RefFwdTritonBwd(torch.autograd.Function):
    """Reference forward + Triton backward: gradcheck of the backward alone."""

    @staticmethod
    def forward(ctx, x, weight, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                meta):
        user_ids, N, top_k, s_g, s_u = meta
        y, h, z, g = mixture_fwd_ref(x, weight, None, expert_A, expert_B, router_weight, user_ids, user_logit_bias,
                                     user_A, user_B, user_router, s_g, s_u, top_k, weight.shape[0])
        ctx.save_for_backward(x, h, z, g, weight, expert_A, expert_B, router_weight, user_A, user_B, user_router)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, z, g, weight, expert_A, expert_B, router_weight, user_A, user_B, user_router = ctx.saved_tensors
        user_ids, N, top_k, s_g, s_u = ctx.meta
        pl = RoutingPlan(user_ids, N)
        nd = ctx.needs_input_grad
        needs = (nd[0], nd[1], False, nd[2], nd[3], nd[4], nd[5], nd[6], nd[7], nd[8])
        gr = MB.mixture_bwd(dy.contiguous(), x, h, z, g, weight, expert_A, expert_B, router_weight, pl.user_ids,
                            pl.order, pl.seg_offsets, user_A, user_B, user_router, s_g, s_u, needs,
                            dx_dtype=x.dtype)
        dx, dW0, _, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV = gr
        return dx, dW0, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV, None


@interp
@pytest.mark.parametrize("top_k", [None, 2])
def test_gradcheck_fp64_backward(top_k):
    """fp64 (the interpreter's tl.dot handles fp64): numerical vs the Triton backward."""
    p = make_inputs(9, 6, 5, 3, 2, 3, 4, "uniform", 0.2, dtype=torch.float64, seed=5)
    keys = ("x", "weight", "expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B",
            "user_router")
    ins = tuple(p[k].clone().requires_grad_(True) for k in keys)
    meta = (p["user_ids"], 4, top_k, p["expert_scale"], p["user_scale"])
    assert torch.autograd.gradcheck(lambda *a: _RefFwdTritonBwd.apply(*a, meta), ins, eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


def _fwd_kernel_importable():
    try:
        import proper_kernels.triton.mixture_fwd  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


needs_fwd = pytest.mark.skipif(not _fwd_kernel_importable(),
                               reason="proper_kernels.triton.mixture_fwd (the forward kernels) is not importable yet")


@interp
@needs_fwd
def test_gradcheck_whole_op():
    """Through lora_mixture(backend="triton"): forward and backward kernels together."""
    p = make_inputs(7, 6, 5, 3, 2, 2, 3, "uniform", 0.2, dtype=torch.float64, seed=6)
    keys = ("x", "weight", "expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B",
            "user_router")
    ins = tuple(p[k].clone().requires_grad_(True) for k in keys)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, w, eA, eB, wr, c, uA, uB, V, b):
        return proper_kernels.lora_mixture(x, w, b, expert_A=eA, expert_B=eB, router_weight=wr, user_ids=p["user_ids"],
                                           user_logit_bias=c, user_A=uA, user_B=uB, user_router=V,
                                           expert_scale=p["expert_scale"], user_scale=p["user_scale"],
                                           backend="triton")

    assert torch.autograd.gradcheck(f, (*ins, bias), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ----------------------------------------------------------------------------- training


def _train(backend, opt_name, steps=3):
    p = make_inputs(33, 20, 16, 3, 4, 4, 5, "zipf", 0.2, seed=11)
    names = ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router")
    params = {k: torch.nn.Parameter(p[k].clone()) for k in names}
    bias = torch.nn.Parameter(torch.zeros(16))
    opt_cls = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}
    opt = opt_cls[opt_name]([*params.values(), bias])
    target = torch.randn(33, 16, generator=torch.Generator().manual_seed(1))
    x = p["x"].clone().requires_grad_(True)  # dx flows too (as into an earlier layer)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        y = proper_kernels.lora_mixture(x, p["weight"], bias, user_ids=p["user_ids"], top_k=2,
                                        expert_scale=p["expert_scale"], user_scale=p["user_scale"],
                                        backend=backend, **params)
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        opt.step()
        history.append((loss.item(), {k: v.detach().clone() for k, v in params.items()}, x.grad.clone()))
    return history


@interp
@needs_fwd
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_matches_reference(opt_name):
    tri = _train("triton", opt_name)
    ref = _train("reference", opt_name)
    for step, ((lt, pt, gt), (lr_, pr, gr)) in enumerate(zip(tri, ref)):
        assert abs(lt - lr_) <= 1e-5 * max(1.0, abs(lr_)), f"step {step}: loss {lt} vs {lr_}"
        assert rel_err(gt, gr) <= 1e-4, f"step {step}: dx"
        for k in pt:
            assert rel_err(pt[k], pr[k]) <= 1e-4, f"step {step}: {k}"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERP, reason="needs CUDA and compiled (non-interpreted) kernels")
@pytest.mark.parametrize("name", ["uniform", "distinct_empty_users_topk", "skewed_top1_d111", "no_users",
                                  "no_experts"])
def test_gpu_bf16_matches_contract(name):
    p, N, top_k = _case(name, torch.float32)
    p = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    p32 = dict(p)
    p = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in p.items()}
    needs = _applies(p)
    out, ref = run_launcher(p, N, top_k, needs)
    # Same-dtype torch error bound: the reference fed bf16-rounded inputs vs fp32 ones.
    _, ref32 = run_launcher(p32, N, top_k, needs)
    for name_, a, b, b32, need in zip(NAMES, out, ref, ref32, needs):
        if not need or a is None or b is None:
            continue
        base_err = rel_err(b, b32)
        assert rel_err(a, b) <= max(4 * base_err, 2e-2), name_


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERP, reason="needs CUDA and compiled (non-interpreted) kernels")
def test_gpu_backward_memory_is_rank_space():
    """The backward's extra memory is O(T (K r + K + r_u)) plus the gradients: no [T, K, d]."""
    T, d, K, r, r_u, N = 4096, 1024, 8, 16, 16, 64
    p = make_inputs(T, d, d, K, r, r_u, N, "uniform", 0.0, dtype=torch.bfloat16, seed=0)
    p = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    needs = (True, False, False, True, True, True, True, True, True, True)
    run_launcher(p, N, None, needs, dx_dtype=torch.bfloat16)  # warm up / compile
    torch.cuda.synchronize()
    pl = RoutingPlan(p["user_ids"], N)
    _, h, z, g = mixture_fwd_ref(p["x"], p["weight"], None, p["expert_A"], p["expert_B"], p["router_weight"],
                                 p["user_ids"], p["user_logit_bias"], p["user_A"], p["user_B"], p["user_router"],
                                 1.0, 1.0, None, d)
    del _
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = MB.mixture_bwd(p["dy"], p["x"], h, z, g, p["weight"], p["expert_A"], p["expert_B"], p["router_weight"],
                         pl.user_ids, pl.order, pl.seg_offsets, p["user_A"], p["user_B"], p["user_router"], 1.0, 1.0,
                         needs, dx_dtype=torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - start
    grads = sum(o.numel() * o.element_size() for o in out if o is not None)
    rank_space = T * (K * r + K + r_u) * 4 * 3  # code buffer + its 16-bit copies for the GEMMs, generous
    dense_tmp = 2 * T * d * 2  # dy W0 in bf16 (becomes dx) + one GEMM workspace
    assert peak <= grads + rank_space + dense_tmp + (64 << 20), (peak, grads)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_opcheck_mixture_bwd(dtype):
    """The bwd custom op vs its fake (shapes, dtypes: dx in x.dtype), schema, no aliasing."""
    p, N, top_k = _case("uniform", dtype)
    _, h, z, g = mixture_fwd_ref(p["x"], p["weight"], None, p["expert_A"], p["expert_B"], p["router_weight"],
                                 p["user_ids"], p["user_logit_bias"], p["user_A"], p["user_B"], p["user_router"],
                                 p["expert_scale"], p["user_scale"], top_k, p["dy"].shape[1])
    uid, order, seg = _plan(p, N)
    args = (p["dy"], p["x"], h, z, g, torch.randn_like(g), p["weight"], p["expert_A"], p["expert_B"],
            p["router_weight"], uid, order, seg,
            p["user_A"], p["user_B"], p["user_router"], p["expert_scale"], p["user_scale"],
            [True, False, True, True, True, True, True, True, True, True])
    torch.library.opcheck(torch.ops.proper_kernels.mixture_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.proper_kernels.mixture_bwd(*args)
    assert out[0].dtype == dtype and out[1].numel() == 0


@interp
@pytest.mark.parametrize("law", ["uniform", "skewed_top1_d111", "user_bias_no_vrouter"])
def test_gate_gradient_joins_softmax_backward(law):
    """The gates' own gradient (balance loss) reaches W_r, c, V, A_u and x, as in autograd."""
    p, N, top_k = _case(law, torch.float32)
    _, h, z, g = mixture_fwd_ref(p["x"], p["weight"], None, p["expert_A"], p["expert_B"], p["router_weight"],
                                 p["user_ids"], p["user_logit_bias"], p["user_A"], p["user_B"], p["user_router"],
                                 p["expert_scale"], p["user_scale"], top_k, p["dy"].shape[1])
    uid, order, seg = _plan(p, N)
    dg = torch.randn_like(g)
    needs = (True,) * 10
    tail = (p["expert_scale"], p["user_scale"], needs)
    out = MB.mixture_bwd(p["dy"], p["x"], h, z, g, p["weight"], p["expert_A"], p["expert_B"], p["router_weight"],
                         uid, order, seg, p["user_A"], p["user_B"], p["user_router"], *tail, dg_ext=dg)
    ref = mixture_bwd_ref(p["dy"], p["x"], h, z, g, p["weight"], p["expert_A"], p["expert_B"], p["router_weight"],
                          p["user_ids"], p["user_A"], p["user_B"], p["user_router"], *tail, dg_ext=dg)
    for name, a, b in zip(["dx", "dW0", "db", "dA_g", "dB_g", "dW_r", "dc", "dA_u", "dB_u", "dV"], out, ref):
        if b is None:
            continue
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()), msg=name)


@interp
def test_balance_loss_trains_router_through_kernels():
    from proper_kernels import balance_loss, lora_mixture

    p, N, top_k = _case("uniform", torch.float32)
    names = ["router_weight", "user_logit_bias", "user_A", "user_router", "expert_A"]
    grads = {}
    for backend in ("reference", "triton"):
        leaves = {k: p[k].detach().clone().requires_grad_(True) for k in names}
        kw = {k: p[k] for k in ("expert_B", "user_B", "expert_scale", "user_scale", "user_ids")}
        y, g = lora_mixture(p["x"], p["weight"], expert_A=leaves["expert_A"], router_weight=leaves["router_weight"],
                            user_logit_bias=leaves["user_logit_bias"], user_A=leaves["user_A"],
                            user_router=leaves["user_router"], top_k=top_k, return_gates=True, backend=backend, **kw)
        (y.square().mean() + balance_loss(g)).backward()
        grads[backend] = {k: v.grad for k, v in leaves.items()}
        # gates alone: the balance loss by itself still reaches the router
        leaves2 = {k: p[k].detach().clone().requires_grad_(True) for k in names}
        _, g2 = lora_mixture(p["x"], p["weight"], expert_A=leaves2["expert_A"], router_weight=leaves2["router_weight"],
                             user_logit_bias=leaves2["user_logit_bias"], user_A=leaves2["user_A"],
                             user_router=leaves2["user_router"], top_k=top_k, return_gates=True, backend=backend, **kw)
        balance_loss(g2).backward()
        grads[backend + "-gates"] = {k: v.grad for k, v in leaves2.items()}
    for key in ("", "-gates"):
        for k in names:
            a, b = grads["triton" + key][k], grads["reference" + key][k]
            if b is None:
                assert a is None or a.abs().max() == 0, k
                continue
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=k + key)
    assert grads["triton-gates"]["router_weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- split over tokens


def _split_cfg(dtype, block_t=16, split_t=32):
    """The launcher's config with a small token chunk, so tiny shapes take the split path."""
    cfg = MB._configs(3, 4, 5, dtype)
    for k in ("xty_small_m", "xty_large_m"):
        cfg[k] = dict(cfg[k], BLOCK_T=block_t, SPLIT_T=split_t)
    return cfg


class _ModeSpy:
    """Stands in for ``_seg_xty_kernel``: records each launch's MODE, then runs it."""

    def __init__(self, fn):
        self.fn, self.modes = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.modes.append(kw["MODE"])
            return self.fn[grid](*args, **kw)
        return launch


@pytest.fixture
def xty_modes(monkeypatch):
    spy = _ModeSpy(MB._seg_xty_kernel)
    monkeypatch.setattr(MB, "_seg_xty_kernel", spy)
    return spy.modes


def _ids_from_lengths(lengths, no_user, gen):
    """User ids with exactly lengths[u] tokens of user u and ``no_user`` tokens of -1, shuffled."""
    ids = torch.cat([torch.full((n,), u) for u, n in enumerate(lengths)] + [torch.full((no_user,), -1)])
    return ids[torch.randperm(ids.numel(), generator=gen)].long()


# name: (segment lengths per user, tokens without a user); chunk = 32 tokens, BLOCK_T = 16
SPLIT_CASES = {
    "one_user_whole_batch": ([0, 83, 0], 0),
    "around_chunk": ([31, 32, 33, 0, 63, 64, 65, 1], 5),
    "prime_T_empty_users": ([0, 40, 0, 0, 17, 33, 0], 7),  # T = 97
    "all_short": ([7, 0, 12, 31, 3], 20),  # T > chunk, every segment shorter: solo chunks only
}
XTY_DIMS = ((5, 37), (37, 3), (4, None))  # (M, Nn): rank x d, d x rank, Y = ones (dc)


def _xty_ref(X, Y, order, seg, n_users, scale):
    """fp64 oracle: out[u] = scale * X_seg^T Y_seg, operands rounded as the kernel's dot rounds them."""
    out = []
    for u in range(n_users):
        idx = order[seg[u + 1]:seg[u + 2]].long()
        x = X[idx].double()
        y = torch.ones(len(idx), 1, dtype=torch.float64) if Y is None else Y[idx].to(X.dtype).double()
        out.append(scale * x.t() @ y)
    return torch.stack(out)


def _xty_inputs(lengths, no_user, M, Nn, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pl = RoutingPlan(_ids_from_lengths(lengths, no_user, gen), len(lengths))
    T = pl.num_tokens
    X = torch.randn(T, M, generator=gen).to(dtype)
    Y = None if Nn is None else torch.randn(T, Nn, generator=gen)  # fp32, like z / the codes
    return pl, X, Y


def _run_xty(pl, X, Y, cfg, lowp, scale=0.625):
    Nn = 1 if Y is None else Y.shape[1]
    out = torch.full((pl.num_users, X.shape[1], Nn), float("nan"))
    return MB._seg_xty(X, Y, out, pl.order, pl.seg_offsets, scale, lowp, cfg)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_seg_xty_split_matches_reference(name, dtype, xty_modes):
    """Chunk + reduce passes vs the fp64 oracle; the split path is really taken."""
    lengths, no_user = SPLIT_CASES[name]
    cfg = _split_cfg(dtype)
    for M, Nn in XTY_DIMS:
        pl, X, Y = _xty_inputs(lengths, no_user, M, Nn, dtype)
        del xty_modes[:]
        out = _run_xty(pl, X, Y, cfg, lowp=dtype == torch.float16 and Y is not None)
        assert xty_modes == [1, 2], xty_modes
        ref = _xty_ref(X, Y, pl.order, pl.seg_offsets, pl.num_users, 0.625)
        assert torch.isfinite(out).all(), (M, Nn)  # users without tokens get zeros, not garbage
        for u, n in enumerate(lengths):
            if n == 0:
                assert (out[u] == 0).all(), (M, Nn, u)
        e = rel_err(out, ref)
        assert e <= (1e-3 if dtype == torch.float16 else 2e-6), f"{(M, Nn)}: {e:.3g}"


@interp
def test_seg_xty_split_deterministic_and_close_to_single_pass(xty_modes):
    lengths, no_user = SPLIT_CASES["around_chunk"]
    pl, X, Y = _xty_inputs(lengths, no_user, 5, 37, torch.float32, seed=1)
    cfg = _split_cfg(torch.float32)
    a = _run_xty(pl, X, Y, cfg, False)
    b = _run_xty(pl, X, Y, cfg, False)
    assert torch.equal(a, b)  # bitwise, run to run
    assert xty_modes == [1, 2, 1, 2]
    del xty_modes[:]
    single = _run_xty(pl, X, Y, MB._configs(3, 4, 5, torch.float32), False)  # T = 294 <= SPLIT_T = 512
    assert xty_modes == [0]
    assert rel_err(a, single) <= 2e-6


@interp
@pytest.mark.parametrize("lengths", [[1], [0, 1, 0], [16, 16]], ids=["T1", "T1_empty_users", "T_eq_chunk"])
def test_seg_xty_short_batch_single_pass(lengths, xty_modes):
    """T <= SPLIT_T: no segment can be long, the one-pass kernel runs alone."""
    pl, X, Y = _xty_inputs(lengths, 0, 6, 19, torch.float32, seed=2)
    out = _run_xty(pl, X, Y, _split_cfg(torch.float32, block_t=16, split_t=32), False)
    assert xty_modes == [0]
    assert rel_err(out, _xty_ref(X, Y, pl.order, pl.seg_offsets, pl.num_users, 0.625)) <= 2e-6


def test_segment_chunks_table():
    """Pure torch: chunk boundaries, solo chunks, workspace rows and the host bounds."""
    from proper_kernels.triton.tiles import segment_chunks

    gen = torch.Generator().manual_seed(3)
    for lengths, chunk in (([31, 32, 33, 0, 63, 64, 65, 1], 32), ([0, 83, 0], 32), ([1], 16), ([0, 0], 16),
                           ([5, 200, 7, 0, 130], 64)):
        seg = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        seg[1:] = torch.tensor(lengths).cumsum(0)
        T = int(seg[-1]) + int(torch.randint(0, 3, (1,), generator=gen))  # T may exceed the users' tokens
        table, ws_off, C, W = segment_chunks(seg, T, chunk)
        assert C == min(T, -(-T // chunk) + len(lengths)) and W == T // chunk + T // (chunk + 1)
        want, rows = [], 0
        for u, n in enumerate(lengths):
            k = -(-n // chunk)
            for i in range(k):
                want.append((u, int(seg[u]) + i * chunk, rows + i if k > 1 else -1))
            assert int(ws_off[u]) == rows
            rows += k if k > 1 else 0
        assert int(ws_off[-1]) == rows <= W
        got = [tuple(c) for c in table.t().tolist() if c[0] >= 0]
        assert got == want and len(want) <= C
        assert (table[:, len(want):] == torch.tensor([[-1], [0], [-1]], dtype=torch.int32)).all()


def force_small_split(monkeypatch):
    """Make the backward split user segments over tokens in chunks of 16 (SPLIT_T)."""
    real = MB._configs

    def small_split(*a, **kw):
        cfg = real(*a, **kw)
        for k in ("xty_small_m", "xty_large_m"):
            cfg[k] = dict(cfg[k], BLOCK_T=16, SPLIT_T=16)
        return cfg

    monkeypatch.setattr(MB, "_configs", small_split)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("law", ["identical", "skewed"])
def test_launcher_with_split_matches_contract(law, dtype, monkeypatch, xty_modes):
    """The whole backward with the split forced: every per-user gradient vs the contract."""
    force_small_split(monkeypatch)
    p = make_inputs(45, 21, 19, 3, 4, 5, 4, law, 0.1, dtype=dtype, seed=7)
    needs = _applies(p)
    out, ref = run_launcher(p, 4, None, needs)
    assert xty_modes == [1, 2] * 4  # dA_u, dB_u, dV, dc
    _check(out, ref, needs, p, TOL[dtype], f"[split {law} {dtype}] ")
    again, _ = run_launcher(p, 4, None, needs)
    for name, a, b in zip(NAMES, out, again):
        assert (a is None and b is None) or torch.equal(a, b), name
