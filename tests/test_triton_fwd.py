"""Tests of the Triton fused forward (proper_kernels/triton/mixture_fwd.py) against the
rank-space contract (proper_kernels.reference.rankspace.mixture_fwd_ref).

Interpreter tests (CPU, TRITON_INTERPRET=1) check every kernel path in fp32 and fp16:
both regimes (decode: split-K shrink + atomics; prefill: plain shrink), both variants
(base fused into the expand kernel; torch base + expand) and the no-W0 variant, over
the popularity laws and awkward sizes. Every output follows the one tolerance rule
(proper_kernels.testing.assert_close): the error against the contract in fp64 on the
same rounded inputs is at most a few times the fp32 contract's own, plus a few ulps of
the output's dtype.

Interpreter mode is fixed when a @triton.jit kernel is *defined* (module import).
This file sets TRITON_INTERPRET=1 before importing triton when there is no CUDA
device (tests/conftest.py does the same for the whole suite). If the kernels were
already imported in compiled mode (a CUDA machine, or another module imported them
first), the in-process interpreter tests are skipped and
``test_interpreter_suite_in_subprocess`` reruns them in a child process with
TRITON_INTERPRET=1 and no visible GPU. GPU tests (bf16/fp16, realistic sizes) run
only where CUDA is.
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

from proper_kernels.reference import lora_mixture_ref, mixture_fwd_ref  # noqa: E402
from proper_kernels.testing import assert_close, at_fp64_and_fp32, mixture_case  # noqa: E402
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
pytestmark = pytest.mark.usefixtures("torch_one_thread", "triton_interpreter_nested_calls")

LAWS = ("distinct", "uniform", "zipf", "identical", "skewed")


# ---------------------------------------------------------------------------------
# Launch and check.
# ---------------------------------------------------------------------------------


def run_fwd(c, **kw):
    """The launcher on a MixtureCase (the plan's int32 ids and order, as the op passes them)."""
    p = c.plan()
    uid, order = (p.user_ids, p.order) if p is not None else (None, None)
    return mixture_fwd(c.x, c.weight, c.bias, c.adapters, uid, order, c.d_out, **kw)


def contract(c):
    """(fp64, fp32) results of the rank-space contract on the case's inputs."""
    return at_fp64_and_fp32(mixture_fwd_ref, c.x, c.weight, c.bias, c.adapters, c.user_ids, c.d_out)


def configs(c, variant):
    """Both regimes whatever T: the decode config splits d_in (atomics), prefill does not."""
    a = c.adapters
    rank = a.num_experts * a.expert_rank + a.user_rank
    d_in = c.x.shape[1]
    return {"decode": fwd_config(1, d_in, c.d_out, rank, variant),
            "prefill": fwd_config(DECODE_MAX_T + 1, d_in, c.d_out, rank, variant)}


def variants(c):
    return ("fused", "standalone") if c.weight is not None else ("mixture",)


def check_outputs(out, refs, tag):
    """y, h, z, g against the contract (y in x's dtype, so with its floor; the codes
    in fp32); shapes, dtypes and contiguity first."""
    ref64, ref32 = refs
    for name, o, r64, r32 in zip("yhzg", out, ref64, ref32):
        assert o.shape == r32.shape, (tag, name, o.shape, r32.shape)
        assert name == "y" or o.dtype == torch.float32, (tag, name, o.dtype)
        assert o.is_contiguous(), (tag, name)
        assert_close(f"{tag} {name}", o, r64, r32)


def check_case(c, tag=""):
    """Every variant x regime of the case against the contract (and the contract's y
    and g against the vectorised reference, the op's oracle); returns the outputs by
    (variant, regime)."""
    refs = contract(c)
    c64 = c.to(torch.float64)
    y_or, g_or = lora_mixture_ref(c64.x, c64.weight, c64.bias, c64.adapters, c.user_ids, d_out=c.d_out)
    torch.testing.assert_close(refs[0][0], y_or, rtol=1e-12, atol=1e-12)
    if g_or is not None:
        torch.testing.assert_close(refs[0][3], g_or, rtol=1e-12, atol=1e-12)
    outs = {}
    for variant in variants(c):
        for regime, cfg in configs(c, variant).items():
            out = outs[variant, regime] = run_fwd(c, variant=variant, config=cfg)
            assert out[0].dtype == c.x.dtype
            check_outputs(out, refs, f"{tag}{variant}/{regime}")
    return outs


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
SIZE_IDS = ["T{}-{}x{}-K{}r{}-N{}ru{}-{}".format(*s) for s in SIZES]


@interp
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_fp32_all_parts(size):
    T, d_in, d_out, K, r, N, r_u, law = size
    check_case(mixture_case(T, d_in, d_out, K, r, r_u, N, law))


@interp
@pytest.mark.parametrize("law", LAWS)
def test_fp32_laws_top_k(law):
    check_case(mixture_case(29, 24, 40, K=4, r=3, r_u=5, N=6, law=law, seed=1, top_k=2))


@interp
@pytest.mark.parametrize("top_k", [1, 3])
def test_fp32_top_k(top_k):
    check_case(mixture_case(23, 33, 24, K=5, r=2, r_u=3, N=4, seed=2, top_k=top_k))


@interp
def test_top_k_ties_go_to_lower_index():
    # No router input: every logit is 0 and the kernel keeps experts 0..top_k-1.
    # (torch.topk on CPU does NOT break ties that way: zeros(1, 4).topk(2) gives
    # [2, 3]; so the expectation is built from the first top_k experts, dense.)
    c = mixture_case(19, 24, 24, K=4, r=2, r_u=2, N=3, router=False, user_bias=False, user_router=False, seed=3,
                     top_k=2)
    a = c.adapters
    first_two = c._replace(adapters=a._replace(expert_A=a.expert_A[:2], expert_B=a.expert_B[:2], top_k=None))
    ref64, ref32 = contract(first_two)
    for variant in ("fused", "standalone"):
        for regime, cfg in configs(c, variant).items():
            y, h, z, g = run_fwd(c, variant=variant, config=cfg)
            torch.testing.assert_close(g, torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(19, 4))
            assert_close(f"{variant}/{regime} y", y, ref64[0], ref32[0])
            assert_close(f"{variant}/{regime} z", z, ref64[2], ref32[2])


OPTIONAL_PARTS = [
    dict(K=0),  # users only
    dict(r_u=0, user_bias=False),  # experts only: user_ids None, one segment
    dict(weight=False),  # no W0: y = b + mixture
    dict(weight=False, bias=False),
    dict(bias=False),
    dict(router=False),  # gates from c_u + V_u z only
    dict(router=False, user_bias=False, user_router=False),  # uniform gates (dense only)
    dict(user_router=False),
    dict(r_u=0),  # c_u only (ids given, no user adapter)
    dict(K=0, r_u=0, user_bias=False),  # base only
]


@interp
@pytest.mark.parametrize("parts", OPTIONAL_PARTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_fp32_optional_parts(parts):
    c = mixture_case(19, 24, 40, **dict(dict(K=3, r=4, r_u=6, N=5, law="zipf", seed=4), **parts))
    check_case(c)
    a = c.adapters
    if a.expert_A is not None and (a.router_weight is not None or a.user_logit_bias is not None):
        # (all-tied logits: see test_top_k_ties_go_to_lower_index)
        check_case(c._replace(adapters=a._replace(top_k=2)), "top_k=2 ")


@interp
def test_users_without_tokens_and_all_no_user():
    c = mixture_case(29, 24, 24, K=3, r=4, r_u=5, N=10, seed=5, no_user=0.0)
    check_case(c._replace(user_ids=torch.where(torch.arange(29) % 3 == 0, 2, 7)))  # users 0,1,3..6,8,9 idle
    c = c._replace(user_ids=torch.full((29,), -1))  # every token without a user: experts only
    for z in (out[2] for out in check_case(c).values()):
        assert z.shape == (29, 5) and bool((z == 0).all())


@interp
@pytest.mark.parametrize("size", SIZES[:5], ids=SIZE_IDS[:5])
def test_fp16(size):
    T, d_in, d_out, K, r, N, r_u, law = size
    check_case(mixture_case(T, d_in, d_out, K, r, r_u, N, law, dtype=torch.float16, seed=6))


@interp
@pytest.mark.parametrize("parts", [dict(weight=False), dict(K=0), dict(r_u=0, user_bias=False)],
                         ids=["no_weight", "no_experts", "no_users"])
def test_fp16_parts_top_k(parts):
    c = mixture_case(31, 40, 24, **dict(dict(K=4, r=4, r_u=6, N=5, law="skewed", dtype=torch.float16, seed=7),
                                        **parts))
    if c.adapters.expert_A is not None:
        c = c._replace(adapters=c.adapters._replace(top_k=2))
    check_case(c)


@interp
def test_mixed_dtypes_fall_back_to_fp32_dots():
    c = mixture_case(19, 24, 24, seed=8)
    c = c._replace(x=c.x.half())
    ref64, ref32 = contract(c)
    for variant in ("fused", "standalone"):
        y, h, z, g = run_fwd(c, variant=variant)
        assert y.dtype == torch.float16
        assert_close(f"{variant} h", h, ref64[1], ref32[1])  # fp32 dots of exact fp16 values
        assert_close(f"{variant} y", y, ref64[0], ref32[0])


@interp
def test_default_choice_and_plan_sizes_not_constexpr():
    # The launcher's own choice (no overrides) in both T buckets; the same compiled
    # configuration serves different T (T only enters as a runtime argument).
    for T in (7, 19):
        c = mixture_case(T, 24, 24, seed=9 + T)
        check_outputs(run_fwd(c), contract(c), f"T={T}")


@interp
@pytest.mark.parametrize("regime_T", [1, DECODE_MAX_T + 1], ids=["decode", "prefill"])
def test_gates_with_empty_output_dim(regime_T):
    """d_out = 0 is accepted; the gates (and h, z) must still be the contract's. In
    the split-K decode regime the expand kernel finishes the gates, and with no d_out
    tile it never runs: the shrink must then finish them itself."""
    c = mixture_case(7, 40, 0, K=3, r=4, r_u=6, N=5, no_user=0.3, expert_scale=0.5, user_scale=1.5)
    cfg = fwd_config(regime_T, 40, 0, 3 * 4 + 6, "fused")
    assert (cfg.split_k > 1) == (regime_T == 1)
    for top_k in (None, 2):
        ck = c._replace(adapters=c.adapters._replace(top_k=top_k))
        check_outputs(run_fwd(ck, config=cfg), contract(ck), f"top_k={top_k}")


def test_fp64_is_not_a_kernel_dtype():
    """The dispatch routes fp64 to the rank-space torch forward (test_dispatch); the
    launcher refuses it by name instead of computing in another precision."""
    c = mixture_case(3, 8, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32 x, got torch.float64"):
        run_fwd(c)


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


def test_interpreter_suite_in_subprocess():
    """When the kernels here are compiled (CUDA machine, or imported earlier without
    the interpreter), rerun this file's interpreter tests in a child process."""
    if _INTERPRETED or _IN_CHILD:
        pytest.skip("interpreter tests already run in this process")
    from proper_kernels.runtime.target import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    env = dict(os.environ, TRITON_INTERPRET="1", PROPER_FWD_TEST_CHILD="1", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ---------------------------------------------------------------------------------
# GPU tests (compiled kernels): bf16/fp16, realistic-ish sizes.
# ---------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 64, 300, 1031])
@pytest.mark.parametrize("law", ["distinct", "zipf", "identical"])
def test_gpu_lowp(dtype, T, law):
    c = mixture_case(T, 264, 200, K=8, r=16, r_u=16, N=64, law=law, dtype=dtype, seed=13, device="cuda")
    refs = contract(c)
    for variant in ("fused", "standalone"):
        check_outputs(run_fwd(c, variant=variant), refs, variant)


@gpu
def test_gpu_fp32_top_k_and_no_weight():
    c = mixture_case(77, 96, 80, K=4, r=8, r_u=8, N=9, law="skewed", seed=14, device="cuda", top_k=2)
    refs = contract(c)
    for variant in ("fused", "standalone"):
        check_outputs(run_fwd(c, variant=variant), refs, variant)
    c = c._replace(weight=None, adapters=c.adapters._replace(top_k=None))
    check_outputs(run_fwd(c), contract(c), "mixture")
