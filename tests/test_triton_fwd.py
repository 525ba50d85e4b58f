"""Tests of the Triton fused forward (proper_kernels/triton/mixture_fwd.py).

Interpreter tests (CPU, TRITON_INTERPRET=1) check every kernel path against the
oracles in fp32 and fp16: both regimes (decode: split-K shrink + atomics; prefill:
plain shrink), both variants (base fused into the expand kernel; torch base +
expand) and the no-W0 variant, over the popularity laws and awkward sizes.

Interpreter mode is fixed when a @triton.jit kernel is *defined* (module import).
This file sets TRITON_INTERPRET=1 before importing triton when there is no CUDA
device (tests/conftest.py does the same for the whole suite). If the kernels were
already imported in compiled mode (a CUDA machine, or another module imported them
first), the in-process interpreter tests are skipped and
``test_interpreter_suite_in_subprocess`` reruns them in a child process with
TRITON_INTERPRET=1 and no visible GPU. GPU tests (bf16/fp16, STYLE.md's relative
criterion) run only where CUDA is.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conftest import skip_if_interpreter_broken  # noqa: E402

triton = pytest.importorskip("triton")
skip_if_interpreter_broken()

import proper_kernels  # noqa: E402
from proper_kernels.ops.plan import RoutingPlan  # noqa: E402
from proper_kernels.reference.mixture import lora_mixture_ref  # noqa: E402
from proper_kernels.reference.rankspace import mixture_fwd_ref  # noqa: E402
from proper_kernels.triton import mixture_fwd as fwd_mod  # noqa: E402
from proper_kernels.triton.mixture_fwd import (  # noqa: E402
    DECODE_MAX_T, FwdConfig, forward_variant, fwd_config, mixture_fwd,
)

_INTERPRETED = type(fwd_mod._mixture_shrink_kernel).__name__ == "InterpretedFunction"
_IN_CHILD = os.environ.get("PROPER_FWD_TEST_CHILD") == "1"
interp = pytest.mark.skipif(
    not _INTERPRETED or os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels were imported in compiled mode: see test_interpreter_suite_in_subprocess",
)
gpu = pytest.mark.skipif(not torch.cuda.is_available() or _INTERPRETED, reason="needs CUDA (compiled kernels)")


# ---------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------

LAWS = ("distinct", "uniform", "zipf", "identical", "skewed")


def draw_users(law: str, T: int, N: int, gen: torch.Generator, no_user_frac: float = 0.0) -> torch.Tensor:
    """Punica's popularity laws; then a fraction of tokens gets user -1."""
    if law == "distinct":
        ids = torch.randperm(max(N, T), generator=gen)[:T] % N
    elif law == "uniform":
        ids = torch.randint(0, N, (T,), generator=gen)
    elif law == "zipf":
        p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, T, replacement=True, generator=gen)
    elif law == "identical":
        ids = torch.full((T,), N // 2, dtype=torch.long)
    elif law == "skewed":
        ids = torch.where(torch.rand(T, generator=gen) < 0.8, torch.zeros(T, dtype=torch.long),
                          torch.randint(0, N, (T,), generator=gen))
    else:
        raise ValueError(law)
    if no_user_frac > 0:
        ids = torch.where(torch.rand(T, generator=gen) < no_user_frac, torch.full_like(ids, -1), ids)
    # Shuffle so that a user's tokens are not contiguous in x (the plan must gather).
    return ids[torch.randperm(T, generator=gen)]


def make_case(T, d_in, d_out, K=3, r=4, N=5, r_u=6, law="uniform", *, dtype=torch.float32,
              weight=True, bias=True, experts=True, router=True, user_bias=True, user_lora=True,
              user_router=True, no_user_frac=0.2, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    a = dict(x=rnd(T, d_in), weight=None, bias=None, expert_A=None, expert_B=None, router_weight=None,
             user_ids=None, user_logit_bias=None, user_A=None, user_B=None, user_router=None,
             expert_scale=0.75, user_scale=1.25, top_k=None, d_out=d_out)
    if weight:
        a["weight"] = rnd(d_out, d_in, scale=d_in ** -0.5)
    if bias:
        a["bias"] = rnd(d_out)
    if experts:
        a["expert_A"] = rnd(K, r, d_in, scale=d_in ** -0.5)
        a["expert_B"] = rnd(K, d_out, r, scale=r ** -0.5)
        if router:
            a["router_weight"] = rnd(K, d_in, scale=d_in ** -0.5)
    users = user_lora or (experts and user_bias)
    if users:
        if experts and user_bias:
            a["user_logit_bias"] = rnd(N, K)
        if user_lora:
            a["user_A"] = rnd(N, r_u, d_in, scale=d_in ** -0.5)
            a["user_B"] = rnd(N, d_out, r_u, scale=r_u ** -0.5)
            if experts and user_router:
                a["user_router"] = rnd(N, K, r_u, scale=r_u ** -0.5)
        a["user_ids"] = draw_users(law, T, N, gen, no_user_frac).to(device)
    return a, N


def run_fwd(a, N, *, variant=None, config=None, top_k=None):
    ids = a["user_ids"]
    if ids is not None:
        plan = RoutingPlan(ids, N)
        uid, order, seg = plan.user_ids, plan.order, plan.seg_offsets
    else:
        uid = order = seg = None
    return mixture_fwd(
        a["x"], a["weight"], a["bias"], a["expert_A"], a["expert_B"], a["router_weight"], uid, order, seg,
        a["user_logit_bias"], a["user_A"], a["user_B"], a["user_router"], a["expert_scale"],
        a["user_scale"], top_k, a["d_out"], variant=variant, config=config,
    )


def run_ref(a, top_k=None, dtype=torch.float32):
    """The rank-space contract on inputs upcast to ``dtype`` (fp32: the exact target)."""
    up = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
    return mixture_fwd_ref(
        up["x"], up["weight"], up["bias"], up["expert_A"], up["expert_B"], up["router_weight"],
        up["user_ids"], up["user_logit_bias"], up["user_A"], up["user_B"], up["user_router"],
        up["expert_scale"], up["user_scale"], top_k, up["d_out"],
    )


def oracle(a, top_k=None):
    up = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
    return lora_mixture_ref(
        up["x"], up["weight"], up["bias"], expert_A=up["expert_A"], expert_B=up["expert_B"],
        expert_scale=up["expert_scale"], router_weight=up["router_weight"], user_ids=up["user_ids"],
        user_logit_bias=up["user_logit_bias"], user_A=up["user_A"], user_B=up["user_B"],
        user_scale=up["user_scale"], user_router=up["user_router"], top_k=top_k, d_out=up["d_out"],
    )


def naive_lowp(a, top_k=None):
    """What a torch user writes in the input dtype (every product rounded to it): the
    error yardstick of STYLE.md for low-precision kernels."""
    dt = a["x"].dtype
    x = a["x"]
    T = x.shape[0]
    y = x @ a["weight"].t() if a["weight"] is not None else x.new_zeros(T, a["d_out"])
    if a["bias"] is not None:
        y = y + a["bias"]
    ids = a["user_ids"]
    safe = ids.long().clamp(min=0) if ids is not None else None
    valid = (ids >= 0).to(dt)[:, None] if ids is not None else None
    z = None
    if a["user_A"] is not None:
        z = torch.bmm(a["user_A"][safe], x[:, :, None])[:, :, 0] * valid
    if a["expert_A"] is not None:
        K, r = a["expert_A"].shape[:2]
        lg = x @ a["router_weight"].t() if a["router_weight"] is not None else x.new_zeros(T, K)
        if a["user_logit_bias"] is not None:
            lg = lg + a["user_logit_bias"][safe] * valid
        if a["user_router"] is not None:
            lg = lg + torch.bmm(a["user_router"][safe], z[:, :, None])[:, :, 0]
        from proper_kernels.reference.mixture import gates_from_logits

        g = gates_from_logits(lg.float(), top_k).to(dt)
        h = x @ a["expert_A"].reshape(K * r, -1).t()
        B_cat = a["expert_B"].permute(1, 0, 2).reshape(a["d_out"], K * r)
        y = y + a["expert_scale"] * ((h * g.repeat_interleave(r, -1)) @ B_cat.t())
    if a["user_B"] is not None:
        y = y + a["user_scale"] * torch.bmm(a["user_B"][safe], z[:, :, None])[:, :, 0] * valid
    return y


def interp_configs(T, a, variant):
    d_in, d_out = a["x"].shape[1], a["d_out"]
    rank = 0
    if a["expert_A"] is not None:
        rank += a["expert_A"].shape[0] * a["expert_A"].shape[1]
    if a["user_A"] is not None:
        rank += a["user_A"].shape[1]
    # Both regimes whatever T: the decode config splits d_in (atomics), prefill does not.
    return {"decode": fwd_config(1, d_in, d_out, rank, variant),
            "prefill": fwd_config(DECODE_MAX_T + 1, d_in, d_out, rank, variant)}


def variants_of(a):
    return ("fused", "standalone") if a["weight"] is not None else ("mixture",)


def check_fp32(a, N, top_k=None):
    ref = run_ref(a, top_k)
    y_or, g_or = oracle(a, top_k)
    torch.testing.assert_close(ref[0], y_or, rtol=1e-5, atol=1e-5)
    for variant in variants_of(a):
        for regime, cfg in interp_configs(a["x"].shape[0], a, variant).items():
            out = run_fwd(a, N, variant=variant, config=cfg, top_k=top_k)
            for name, o, rf in zip("yhzg", out, ref):
                assert o.shape == rf.shape and o.dtype == rf.dtype, (name, o.shape, rf.shape, o.dtype, rf.dtype)
                assert o.is_contiguous()
                torch.testing.assert_close(o, rf, rtol=2e-5, atol=2e-5, msg=lambda m: f"{variant}/{regime} {name}: {m}")
            if g_or is not None:
                torch.testing.assert_close(out[3], g_or, rtol=2e-5, atol=2e-5)


def check_lowp(a, N, top_k=None, factor=2.0):
    """y: |kernel - fp32 ref| <= factor * |torch same-dtype - fp32 ref| (+ a floor of a
    few ulps of the output); h, z, g: fp32 accumulation of exact products, tight."""
    ref = run_ref(a, top_k)
    y_lp = naive_lowp(a, top_k).float()
    torch_err = (y_lp - ref[0]).abs().max().item()
    scale = ref[0].abs().max().item()
    eps = torch.finfo(a["x"].dtype).eps
    for variant in variants_of(a):
        for regime, cfg in interp_configs(a["x"].shape[0], a, variant).items():
            y, h, z, g = run_fwd(a, N, variant=variant, config=cfg, top_k=top_k)
            assert y.dtype == a["x"].dtype and h.dtype == torch.float32
            err = (y.float() - ref[0]).abs().max().item()
            assert err <= factor * torch_err + 2 * eps * scale, (variant, regime, err, torch_err)
            for name, o, rf in zip("hzg", (h, z, g), ref[1:]):
                torch.testing.assert_close(o, rf, rtol=1e-4, atol=1e-4, msg=lambda m: f"{variant}/{regime} {name}: {m}")


# ---------------------------------------------------------------------------------
# Interpreter tests.
# ---------------------------------------------------------------------------------

# (T, d_in, d_out, K, r, N, r_u, law): awkward sizes, T = 1 and primes, dims not
# multiples of 16, r_u != r, K = 1, r = 1, more users than tokens.
SIZES = [
    (1, 24, 40, 3, 4, 5, 6, "uniform"),
    (19, 40, 24, 4, 5, 6, 3, "zipf"),
    (37, 33, 33, 2, 16, 40, 16, "distinct"),
    (37, 24, 40, 3, 4, 7, 6, "identical"),
    (53, 40, 24, 5, 3, 9, 5, "skewed"),
    (19, 24, 17, 1, 1, 3, 1, "uniform"),
    (37, 48, 33, 8, 2, 12, 7, "zipf"),
]


@interp
@pytest.mark.parametrize("T,d_in,d_out,K,r,N,r_u,law", SIZES)
def test_fp32_all_parts(T, d_in, d_out, K, r, N, r_u, law):
    a, N = make_case(T, d_in, d_out, K, r, N, r_u, law)
    check_fp32(a, N)


@interp
@pytest.mark.parametrize("law", LAWS)
def test_fp32_laws_top_k(law):
    a, N = make_case(29, 24, 40, K=4, r=3, N=6, r_u=5, law=law, seed=1)
    check_fp32(a, N, top_k=2)


@interp
@pytest.mark.parametrize("top_k", [1, 3])
def test_fp32_top_k(top_k):
    a, N = make_case(23, 33, 24, K=5, r=2, N=4, r_u=3, law="uniform", seed=2)
    check_fp32(a, N, top_k=top_k)


@interp
def test_top_k_ties_go_to_lower_index():
    # No router input: every logit is 0 and the kernel keeps experts 0..top_k-1.
    # (torch.topk on CPU does NOT break ties that way: zeros(1, 4).topk(2) gives
    # [2, 3]; so the expectation is built from the first top_k experts, dense.)
    a, N = make_case(19, 24, 24, K=4, r=2, N=3, r_u=2, router=False, user_bias=False,
                     user_router=False, seed=3)
    first_two = dict(a, expert_A=a["expert_A"][:2], expert_B=a["expert_B"][:2])
    ref = run_ref(first_two)
    for variant in ("fused", "standalone"):
        for cfg in interp_configs(19, a, variant).values():
            y, h, z, g = run_fwd(a, N, variant=variant, config=cfg, top_k=2)
            torch.testing.assert_close(g, torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(19, 4))
            torch.testing.assert_close(y, ref[0], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(z, ref[2], rtol=2e-5, atol=2e-5)


@interp
@pytest.mark.parametrize(
    "parts",
    [
        dict(experts=False),  # users only
        dict(user_lora=False, user_bias=False),  # experts only: user_ids None, one segment
        dict(weight=False),  # no W0: y = b + mixture
        dict(weight=False, bias=False),
        dict(bias=False),
        dict(router=False),  # gates from c_u + V_u z only
        dict(router=False, user_bias=False, user_router=False),  # uniform gates (dense only)
        dict(user_router=False),
        dict(user_lora=False),  # c_u only (ids given, no user adapter)
        dict(experts=False, user_lora=False, user_bias=False),  # base only
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_fp32_optional_parts(parts):
    a, N = make_case(19, 24, 40, K=3, r=4, N=5, r_u=6, law="zipf", seed=4, **parts)
    check_fp32(a, N)
    if a["expert_A"] is not None and (a["router_weight"] is not None or a["user_logit_bias"] is not None):
        check_fp32(a, N, top_k=2)  # (all-tied logits: see test_top_k_ties_go_to_lower_index)


@interp
def test_users_without_tokens_and_all_no_user():
    a, N = make_case(29, 24, 24, K=3, r=4, N=10, r_u=5, seed=5, no_user_frac=0.0)
    a["user_ids"] = torch.where(torch.arange(29) % 3 == 0, 2, 7)  # users 0,1,3..6,8,9 idle
    check_fp32(a, N)
    a["user_ids"] = torch.full((29,), -1)  # every token without a user: experts only
    check_fp32(a, N)
    z = run_fwd(a, N)[2]
    assert z.shape == (29, 5) and bool((z == 0).all())


@interp
@pytest.mark.parametrize("T,d_in,d_out,K,r,N,r_u,law", SIZES[:5])
def test_fp16(T, d_in, d_out, K, r, N, r_u, law):
    a, N = make_case(T, d_in, d_out, K, r, N, r_u, law, dtype=torch.float16, seed=6)
    check_lowp(a, N)


@interp
@pytest.mark.parametrize("parts", [dict(weight=False), dict(experts=False), dict(user_lora=False, user_bias=False)])
def test_fp16_parts_top_k(parts):
    a, N = make_case(31, 40, 24, K=4, r=4, N=5, r_u=6, law="skewed", dtype=torch.float16, seed=7, **parts)
    check_lowp(a, N, top_k=2 if a["expert_A"] is not None else None)


@interp
def test_mixed_dtypes_fall_back_to_fp32_dots():
    a, N = make_case(19, 24, 24, dtype=torch.float32, seed=8)
    a["x"] = a["x"].half()
    ref = run_ref(a)
    for variant in ("fused", "standalone"):
        y, h, z, g = run_fwd(a, N, variant=variant)
        torch.testing.assert_close(h, ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.float(), ref[0], rtol=2e-3, atol=2e-3)


@interp
def test_default_choice_and_plan_sizes_not_constexpr():
    # The launcher's own choice (no overrides) in both T buckets; the same compiled
    # configuration serves different T (T only enters as a runtime argument).
    for T in (7, 19):
        a, N = make_case(T, 24, 24, seed=9 + T)
        out = run_fwd(a, N)
        ref = run_ref(a)
        for o, rf in zip(out, ref):
            torch.testing.assert_close(o, rf, rtol=2e-5, atol=2e-5)


def test_forward_variant_and_config_table():
    assert forward_variant(64, 4096, 4096, has_weight=False) == "mixture"
    assert forward_variant(64, 4096, 4096, dtype=torch.bfloat16) == "fused"
    assert forward_variant(8192, 4096, 4096, dtype=torch.bfloat16) == "fused"
    assert forward_variant(8192, 4096, 4096, dtype=torch.float32) == "standalone"
    assert forward_variant(8192, 4096, 4096, dtype=torch.bfloat16, same_dtypes=False) == "standalone"
    assert forward_variant(8192, 4096, 4096, dtype=torch.bfloat16, rank=1024) == "standalone"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    # The H100 table: decode fills the SMs, no per-T configs inside a bucket.
    c = fwd_config(64, 4096, 4096, 144, "fused")
    assert isinstance(c, FwdConfig) and c.regime == "decode" and c.split_k > 1
    assert triton.cdiv(64, c.block_m) * c.split_k >= 128
    assert triton.cdiv(64, c.block_m) * triton.cdiv(4096, c.block_n) >= 128
    assert fwd_config(8192, 4096, 4096, 144, "fused") == fwd_config(5000, 4096, 4096, 144, "fused")


# ---------------------------------------------------------------------------------
# Custom op, public API, torch.compile (under the interpreter on CPU).
# ---------------------------------------------------------------------------------


def _op_args(a, N, top_k=0):
    plan = RoutingPlan(a["user_ids"], N)
    return (a["x"], a["weight"], a["bias"], a["expert_A"], a["expert_B"], a["router_weight"],
            plan.user_ids, plan.order, plan.seg_offsets, a["user_logit_bias"], a["user_A"], a["user_B"],
            a["user_router"], a["expert_scale"], a["user_scale"], top_k, a["d_out"])


@interp
@pytest.mark.parametrize("top_k", [0, 2])
def test_opcheck_mixture_fwd(top_k):
    import proper_kernels.ops.fused  # noqa: F401  (registers the ops)

    a, N = make_case(11, 24, 20, K=3, r=4, N=4, r_u=5, seed=10)
    args = _op_args(a, N, top_k)
    torch.library.opcheck(torch.ops.proper_kernels.mixture_fwd.default, args)
    y, h, z, g = torch.ops.proper_kernels.mixture_fwd(*args)
    ref = run_ref(a, top_k or None)
    torch.testing.assert_close(y, ref[0], rtol=2e-5, atol=2e-5)


def _api_kwargs(a):
    return dict(expert_A=a["expert_A"], expert_B=a["expert_B"], expert_scale=a["expert_scale"],
                router_weight=a["router_weight"], user_logit_bias=a["user_logit_bias"],
                user_A=a["user_A"], user_B=a["user_B"], user_scale=a["user_scale"],
                user_router=a["user_router"])


@interp
def test_lora_mixture_backend_triton_matches_reference():
    a, N = make_case(3 * 7, 24, 20, K=3, r=4, N=4, r_u=5, seed=11)
    x = a["x"].reshape(3, 7, 24)
    ids = a["user_ids"].reshape(3, 7)
    y, g = proper_kernels.lora_mixture(x, a["weight"], a["bias"], user_ids=ids, top_k=2,
                                       return_gates=True, backend="triton", **_api_kwargs(a))
    y_ref, g_ref = proper_kernels.lora_mixture(x, a["weight"], a["bias"], user_ids=ids, top_k=2,
                                               return_gates=True, backend="reference", **_api_kwargs(a))
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g, g_ref, rtol=2e-5, atol=2e-5)


def _compile_and_check(a, N):
    plan = proper_kernels.plan(a["user_ids"], N)
    kw = _api_kwargs(a)

    def f(x, w, b):
        return proper_kernels.lora_mixture(x, w, b, plan=plan, top_k=2, backend="triton", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(a["x"], a["weight"], a["bias"])
    torch.testing.assert_close(y, run_ref(a, top_k=2)[0], rtol=2e-5, atol=2e-5)


@interp
def test_torch_compile_fullgraph_public_api():
    a, N = make_case(13, 24, 20, K=3, r=4, N=4, r_u=5, seed=12)
    _compile_and_check(a, N)


def test_interpreter_suite_in_subprocess():
    """When the kernels here are compiled (CUDA machine, or imported earlier without
    the interpreter), rerun this file's interpreter tests in a child process."""
    if _INTERPRETED or _IN_CHILD:
        pytest.skip("interpreter tests already run in this process")
    from proper_kernels.triton.target import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    env = dict(os.environ, TRITON_INTERPRET="1", PROPER_FWD_TEST_CHILD="1", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ---------------------------------------------------------------------------------
# GPU tests (compiled kernels): bf16/fp16, realistic-ish sizes, STYLE.md criterion.
# ---------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 64, 300, 1031])
@pytest.mark.parametrize("law", ["distinct", "zipf", "identical"])
def test_gpu_lowp(dtype, T, law):
    a, N = make_case(T, 264, 200, K=8, r=16, N=64, r_u=16, law=law, dtype=dtype, seed=13, device="cuda")
    ref = run_ref(a)
    y_lp = naive_lowp(a).float()
    torch_err = (y_lp - ref[0]).abs().max().item()
    eps = torch.finfo(dtype).eps
    for variant in ("fused", "standalone"):
        y, h, z, g = run_fwd(a, N, variant=variant)
        err = (y.float() - ref[0]).abs().max().item()
        assert err <= 3 * torch_err + 2 * eps * ref[0].abs().max().item(), (variant, err, torch_err)
        for o, rf in zip((h, z, g), ref[1:]):
            torch.testing.assert_close(o, rf, rtol=2e-3, atol=2e-3)


@gpu
def test_gpu_fp32_top_k_and_no_weight():
    a, N = make_case(77, 96, 80, K=4, r=8, N=9, r_u=8, law="skewed", seed=14, device="cuda")
    ref = run_ref(a, top_k=2)
    for variant in ("fused", "standalone"):
        out = run_fwd(a, N, variant=variant, top_k=2)
        for o, rf in zip(out, ref):
            torch.testing.assert_close(o, rf, rtol=1e-4, atol=1e-4)
    a["weight"] = None
    ref = run_ref(a)
    for o, rf in zip(run_fwd(a, N), ref):
        torch.testing.assert_close(o, rf, rtol=1e-4, atol=1e-4)


@interp
def test_strided_bias():
    """A non-contiguous bias (weight None: the 'mixture' variant) reads the right elements."""
    import proper_kernels as pk

    torch.manual_seed(0)
    x, A, B = torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(2, 12, 3)
    b = torch.randn(24)[::2]
    for w in (None, torch.randn(12, 16)):
        y = pk.lora_mixture(x, w, b, expert_A=A, expert_B=B, backend="triton")
        torch.testing.assert_close(y, pk.lora_mixture(x, w, b, expert_A=A, expert_B=B, backend="reference"),
                                   rtol=2e-5, atol=2e-5)
