"""Edge cases of the Triton launchers found in review (interpreter on CPU, tiny shapes).

Each test pins one defect that the broader suites in test_triton_fwd.py /
test_triton_bwd.py did not reach.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import skip_if_interpreter_broken  # noqa: E402

triton = pytest.importorskip("triton")
skip_if_interpreter_broken()

from proper_kernels.ops.plan import RoutingPlan  # noqa: E402
from proper_kernels.reference.rankspace import mixture_fwd_ref  # noqa: E402
from proper_kernels.triton import mixture_fwd as fwd_mod  # noqa: E402
from proper_kernels.triton.mixture_fwd import DECODE_MAX_T, fwd_config, mixture_fwd  # noqa: E402
from proper_kernels.triton.target import max_shared_memory  # noqa: E402
from test_triton_bwd import force_small_split  # noqa: E402

_INTERPRETED = type(fwd_mod._mixture_shrink_kernel).__name__ == "InterpretedFunction"
interp = pytest.mark.skipif(not _INTERPRETED or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="interpreter tests (CPU tensors) need TRITON_INTERPRET=1")


def _gen_case(T, d_in, d_out, K, r, N, r_u, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(
        x=rnd(T, d_in), weight=rnd(d_out, d_in), bias=rnd(d_out), expert_A=rnd(K, r, d_in),
        expert_B=rnd(K, d_out, r), router_weight=rnd(K, d_in), user_logit_bias=rnd(N, K),
        user_A=rnd(N, r_u, d_in), user_B=rnd(N, d_out, r_u), user_router=rnd(N, K, r_u),
        user_ids=torch.randint(-1, N, (T,), generator=gen),
    )


@interp
@pytest.mark.parametrize("regime_T", [1, DECODE_MAX_T + 1], ids=["decode", "prefill"])
def test_gates_with_empty_output_dim(regime_T):
    """d_out = 0 is accepted; the gates (and h, z) must still be the reference's. In
    the split-K decode regime the expand kernel finishes the gates, and with no d_out
    tile it never ran: g came back as uninitialised memory."""
    a = _gen_case(7, 40, 0, 3, 4, 5, 6)
    plan = RoutingPlan(a["user_ids"], 5)
    cfg = fwd_config(regime_T, 40, 0, 3 * 4 + 6, "fused")
    assert (cfg.split_k > 1) == (regime_T == 1)
    args = (a["x"], a["weight"], a["bias"], a["expert_A"], a["expert_B"], a["router_weight"])
    users = (a["user_logit_bias"], a["user_A"], a["user_B"], a["user_router"], 0.5, 1.5)
    for top_k in (None, 2):
        ref = mixture_fwd_ref(*args, a["user_ids"], *users, top_k, 0)
        out = mixture_fwd(*args, plan.user_ids, plan.order, plan.seg_offsets, *users, top_k, 0, config=cfg)
        for name, o, rf in zip("yhzg", out, ref):
            assert o.shape == rf.shape, name
            torch.testing.assert_close(o, rf, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_max_shared_memory_table():
    """Opt-in shared memory per block (CUDA programming guide, cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    kb = 1024
    assert max_shared_memory(80) == 163 * kb and max_shared_memory(86) == 99 * kb
    assert max_shared_memory(89) == 99 * kb and max_shared_memory(90) == 227 * kb
    assert max_shared_memory(100) == 227 * kb
    # Consumer / workstation Blackwell (RTX 50xx, RTX PRO 6000): 101376 B, like sm_86 / sm_89.
    assert max_shared_memory(120) == 99 * kb and max_shared_memory(121) == 99 * kb


class _Fp32FloatArgs:
    """Launches a kernel as compiled Triton does: every Python float argument is
    rounded to fp32 (the interpreter keeps it in fp64)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kw):
            args = [float(torch.tensor(a, dtype=torch.float32)) if isinstance(a, float) else a for a in args]
            return self.fn[grid](*args, **kw)
        return launch


@interp
@pytest.mark.parametrize("split", [False, True], ids=["one_pass", "split_T"])
def test_fp64_backward_keeps_fp64_scales(split, monkeypatch):
    """fp64 gradients with scales that fp32 cannot hold (0.1, 0.3): a compiled kernel
    gets float arguments as fp32, so e = s_g B^T dy, dz = s_u B_u^T dy and dB_u were off
    by ~1e-8 relative (fp32 scale) instead of fp64 round-off."""
    from proper_kernels.reference.rankspace import mixture_bwd_ref
    from proper_kernels.triton import mixture_bwd as MB

    for name in ("_mixture_bwd_rank_kernel", "_seg_xty_kernel"):
        monkeypatch.setattr(MB, name, _Fp32FloatArgs(getattr(MB, name)))
    if split:
        force_small_split(monkeypatch)
    a = {k: (v.double() if v.is_floating_point() else v) for k, v in _gen_case(37, 20, 18, 3, 2, 4, 3).items()}
    if split:
        a["user_ids"] = torch.where(torch.arange(37) % 5 == 0, -1, 2)  # one user, 29 tokens: 2 chunks
    s_g, s_u = 0.1, 0.3
    args = (a["x"], a["weight"], None, a["expert_A"], a["expert_B"], a["router_weight"], a["user_ids"],
            a["user_logit_bias"], a["user_A"], a["user_B"], a["user_router"], s_g, s_u, None, 18)
    _, h, z, g = mixture_fwd_ref(*args)
    dy = torch.randn(37, 18, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = RoutingPlan(a["user_ids"], 4)
    needs = (True,) * 10
    common = (dy, a["x"], h, z, g, a["weight"], a["expert_A"], a["expert_B"], a["router_weight"])
    out = MB.mixture_bwd(*common, plan.user_ids, plan.order, plan.seg_offsets, a["user_A"], a["user_B"],
                         a["user_router"], s_g, s_u, needs)
    ref = mixture_bwd_ref(*common, a["user_ids"], a["user_A"], a["user_B"], a["user_router"], s_g, s_u, needs,
                          num_users=4)
    for name, o, rf in zip(("dx", "dW0", "db", "dA_g", "dB_g", "dW_r", "dc", "dA_u", "dB_u", "dV"), out, ref):
        assert o.dtype == torch.float64, name
        err = ((o - rf).abs().max() / rf.abs().max()).item()
        assert err <= 1e-12, f"{name}: relative error {err:.3g}"
