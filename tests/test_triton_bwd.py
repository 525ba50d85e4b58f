"""Tests of the fused Triton backward (proper_kernels/triton/mixture_bwd.py) against the
rank-space contract (proper_kernels.reference.rankspace.mixture_bwd_ref).

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before the kernels are *defined* (triton.jit reads it
at decoration). tests/conftest.py sets it; this module also sets it (setdefault)
before importing triton, so it works alone too. If the kernel module was already
imported without the interpreter and there is no GPU, the module is skipped. The
interpreter's tl.dot is wrong for bf16, so interpreter tests use fp32 / fp16 / fp64;
bf16 runs in the GPU tests (skipped without CUDA).

Checked: every gradient of the launcher against the contract and against autograd of
``lora_mixture_ref``, over popularity laws and awkward sizes, under the one tolerance
rule (proper_kernels.testing.assert_close: fp64 contract as the oracle, the fp32
contract as the baseline); frozen subsets (``needs``); determinism; the gates' own
gradient; fp64 gradcheck of a reference forward + Triton backward; fp64 scales that
fp32 cannot hold; the per-user reductions' split over tokens (a small SPLIT_T forced
through the config), bitwise run to run, and which passes run. Launches of the same
case are made once per module (``launched``) and shared by the tests that read them.
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

from proper_kernels.ops.plan import RoutingPlan  # noqa: E402
from proper_kernels.reference import Adapters, lora_mixture_ref, mixture_bwd_ref, mixture_fwd_ref  # noqa: E402
from proper_kernels.testing import assert_close, at_fp64_and_fp32, mixture_case  # noqa: E402
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
pytestmark = pytest.mark.usefixtures("torch_one_thread", "triton_interpreter_nested_calls")

NAMES = ("dx", "dW0", "db", "dA_g", "dB_g", "dW_r", "dc", "dA_u", "dB_u", "dV")
ALL = (True,) * 10


# ----------------------------------------------------------------------------- inputs

# name: (T, d_in, d_out, K, r, r_u, N, law, top_k, no_user fraction, extra mixture_case kwargs)
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


def make_case(T, d_in, d_out, K, r, r_u, N, law="uniform", no_user=0.2, dtype=torch.float32, seed=0, top_k=None,
              **kw):
    """(MixtureCase without bias, dy [T, d_out]): the backward's inputs but the codes."""
    c = mixture_case(T, d_in, d_out, K, r, r_u, N, law, no_user=no_user, dtype=dtype, seed=seed, bias=False,
                     expert_scale=1.5, user_scale=0.75, top_k=top_k, **kw)
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    return c, dy


@functools.lru_cache(maxsize=None)
def case(name, dtype):
    T, d_in, d_out, K, r, r_u, N, law, top_k, no_user, kw = CASES[name]
    return make_case(T, d_in, d_out, K, r, r_u, N, law, no_user, dtype, top_k=top_k, **kw)


def codes(c):
    """(h, z, g) of the contract's forward: what the forward kernels save."""
    return mixture_fwd_ref(c.x, c.weight, None, c.adapters, c.user_ids, c.d_out)[1:]


def launch(c, dy, needs, *, dx_dtype=None, dg_ext=None):
    """The launcher on the contract forward's codes."""
    p = c.plan()
    order, seg = (p.order, p.seg_offsets) if p is not None else (None, None)
    return MB.mixture_bwd(dy, c.x, *codes(c), c.weight, c.adapters, order, seg, tuple(needs), dx_dtype=dx_dtype,
                          dg_ext=dg_ext)


def contract(c, dy, needs, dg_ext=None):
    """(fp64, fp32) gradients of the contract on the same inputs and codes."""
    return at_fp64_and_fp32(mixture_bwd_ref, dy, c.x, *codes(c), c.weight, c.adapters, c.user_ids, tuple(needs),
                            dg_ext=dg_ext, num_users=c.N)


def applies(c):
    a = c.adapters
    has_e = a.expert_A is not None
    return (True, c.weight is not None, True, has_e, has_e, a.router_weight is not None,
            has_e and a.user_logit_bias is not None, a.user_A is not None, a.user_B is not None,
            a.user_router is not None)


@functools.lru_cache(maxsize=None)
def launched(name, dtype, needs=None):
    """One launch per (case, dtype, needs) for the whole module (needs None: applies)."""
    c, dy = case(name, dtype)
    return launch(c, dy, needs or applies(c))


def check(out, refs, needs, c, tag=""):
    """Every needed gradient against the contract; the others are None (or absent)."""
    lowp = c.x.dtype in (torch.float16, torch.bfloat16)
    for name, a, r64, r32, need, app in zip(NAMES, out, *refs, needs, applies(c)):
        if not need:
            assert a is None, f"{tag}{name} computed though not needed"
            continue
        if name == "dc" and c.adapters.user_logit_bias is None:
            continue  # the launcher does not know whether the bias exists; nobody asks then
        if not app:
            assert a is None or a.numel() == 0 or r32 is None, f"{tag}{name}"
            continue
        assert a is not None and r32 is not None, f"{tag}{name} missing"
        # 16-bit: the kernels round the rank-space codes (dh, dl, dz) and dy W0 to the
        # input dtype before the tensor-core dots, as torch.autocast would, while the
        # contract works in fp32 from the same inputs: the result has the input
        # dtype's precision, so its floor is that dtype's.
        assert_close(f"{tag}{name}", a, r64, r32, dtype=c.x.dtype if lowp else None)


# ----------------------------------------------------------------------------- vs contract


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_launcher_matches_contract(name, dtype):
    c, dy = case(name, dtype)
    out = launched(name, dtype)
    check(out, contract(c, dy, applies(c)), applies(c), c, f"[{name} {dtype}] ")
    assert out[0].dtype == torch.float32  # dx in the compute dtype by default


@interp
@pytest.mark.parametrize("law", ("distinct", "uniform", "zipf", "identical", "skewed"))
def test_popularity_laws(law):
    c, dy = make_case(45, 24, 20, 3, 4, 4, 9, law, 0.15, seed=3, top_k=2 if law == "zipf" else None)
    needs = applies(c)
    check(launch(c, dy, needs), contract(c, dy, needs), needs, c, f"[{law}] ")


@interp
def test_dx_in_input_dtype():
    c, dy = case("uniform", torch.float16)
    needs = applies(c)
    dx = launch(c, dy, needs, dx_dtype=torch.float16)[0]
    assert dx.dtype == torch.float16
    ref64, ref32 = contract(c, dy, needs)
    assert_close("dx", dx, ref64[0], ref32[0])


@interp
@pytest.mark.parametrize("subset", range(8))
def test_frozen_subsets(subset):
    """Each subset of needs: the others are None, the rest equal the full result."""
    full = launched("prime_rank_mismatch", torch.float32, ALL)
    gen = torch.Generator().manual_seed(100 + subset)
    if subset < 3:  # stage-shaped subsets: group stage, user stage, only dx
        needs = [(1, 0, 0, 1, 1, 1, 1, 0, 0, 0), (1, 0, 0, 0, 0, 0, 1, 1, 1, 1), (1,) + (0,) * 9][subset]
    else:
        needs = tuple(int(b) for b in (torch.rand(10, generator=gen) < 0.4).tolist())
    needs = tuple(bool(b) for b in needs)
    out = launched("prime_rank_mismatch", torch.float32, needs)
    for name, a, f, need in zip(NAMES, out, full, needs):
        if not need:
            assert a is None, name
        else:
            assert torch.allclose(a, f, rtol=0, atol=1e-6 * f.abs().max().item() + 1e-12), name


@interp
def test_nothing_needed():
    c, dy = case("uniform", torch.float32)
    assert all(o is None for o in launch(c, dy, (False,) * 10))


@interp
def test_deterministic():
    c, dy = case("skewed_top1_d111", torch.float32)
    a = launched("skewed_top1_d111", torch.float32, ALL)
    b = launch(c, dy, ALL)
    for name, x, y in zip(NAMES, a, b):
        assert (x is None and y is None) or torch.equal(x, y), name


def _autograd_grads(c, dy):
    """Gradients of the vectorised reference by autograd: x, W0 and every adapter tensor."""
    x, w = (t.clone().requires_grad_(True) if t is not None else None for t in (c.x, c.weight))
    a = c.adapters._replace(**{k: v.clone().requires_grad_(True) for k, v in c.adapters._asdict().items()
                               if torch.is_tensor(v)})
    y, _ = lora_mixture_ref(x, w, None, a, c.user_ids)
    y.backward(dy)
    return [t.grad if t is not None else None for t in (x, w, None, *a.tensors())]


@interp
@pytest.mark.parametrize("name", ["uniform", "distinct_empty_users_topk", "no_experts", "no_users"])
def test_launcher_matches_autograd(name):
    """Against autograd of the vectorised reference (not only the rank-space contract)."""
    c, dy = case(name, torch.float32)
    out = launched(name, torch.float32)
    ref64, ref32 = at_fp64_and_fp32(_autograd_grads, c, dy)
    for g_name, a, r64, r32 in zip(NAMES, out, ref64, ref32):
        if r32 is not None:
            assert_close(g_name, a, r64, r32)


@interp
@pytest.mark.parametrize("name", ["uniform", "skewed_top1_d111", "user_bias_no_vrouter"])
def test_gate_gradient_joins_softmax_backward(name):
    """The gates' own gradient (balance loss) reaches W_r, c, V, A_u and x, as in the contract."""
    c, dy = case(name, torch.float32)
    dg = torch.randn(c.x.shape[0], c.adapters.num_experts, generator=torch.Generator().manual_seed(4))
    out = launch(c, dy, ALL, dg_ext=dg)
    refs = contract(c, dy, ALL, dg_ext=dg)
    for g_name, a, r64, r32 in zip(NAMES, out, *refs):
        if r32 is not None:
            assert_close(g_name, a, r64, r32)


# ----------------------------------------------------------------------------- fp64


class _RefFwdTritonBwd(torch.autograd.Function):
    """Reference forward + Triton backward: gradcheck of the backward alone."""

    @staticmethod
    def forward(ctx, x, weight, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                meta):
        user_ids, N, top_k, s_g, s_u = meta
        adapters = Adapters(expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router,
                               s_g, s_u, top_k)
        y, h, z, g = mixture_fwd_ref(x, weight, None, adapters, user_ids, weight.shape[0])
        ctx.save_for_backward(x, h, z, g, weight)
        ctx.adapters, ctx.meta = adapters, meta
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, z, g, weight = ctx.saved_tensors
        user_ids, N, _, _, _ = ctx.meta
        pl = RoutingPlan(user_ids, N)
        nd = ctx.needs_input_grad
        needs = (nd[0], nd[1], False) + tuple(nd[2:9])
        gr = MB.mixture_bwd(dy.contiguous(), x, h, z, g, weight, ctx.adapters, pl.order, pl.seg_offsets, needs,
                            dx_dtype=x.dtype)
        dx, dW0, _, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV = gr
        return dx, dW0, dA_g, dB_g, dW_r, dc, dA_u, dB_u, dV, None


@interp
@pytest.mark.parametrize("top_k", [None, 2])
def test_gradcheck_fp64_backward(top_k):
    """fp64 (the interpreter's tl.dot handles fp64): numerical vs the Triton backward."""
    c, _ = make_case(9, 6, 5, 3, 2, 3, 4, "uniform", 0.2, dtype=torch.float64, seed=5)
    ins = tuple(t.clone().requires_grad_(True) for t in (c.x, c.weight, *c.adapters.tensors()))
    meta = (c.user_ids, c.N, top_k, c.adapters.expert_scale, c.adapters.user_scale)
    assert torch.autograd.gradcheck(lambda *a: _RefFwdTritonBwd.apply(*a, meta), ins, eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


class _Fp32FloatArgs:
    """Launches a kernel as compiled Triton does: every Python float argument is
    rounded to fp32 (the interpreter keeps it in fp64)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            args = [float(torch.tensor(a, dtype=torch.float32)) if isinstance(a, float) else a for a in args]
            return self.fn[grid](*args, **kw)
        return launch_


@interp
@pytest.mark.parametrize("split", [False, True], ids=["one_pass", "split_T"])
def test_fp64_backward_keeps_fp64_scales(split, monkeypatch):
    """fp64 gradients with scales that fp32 cannot hold (0.1, 0.3): a compiled kernel
    gets float arguments as fp32, so e = s_g B^T dy, dz = s_u B_u^T dy and dB_u would be
    off by ~1e-8 relative (an fp32 scale) instead of fp64 round-off."""
    for name in ("_mixture_bwd_rank_kernel", "_seg_xty_kernel"):
        monkeypatch.setattr(MB, name, _Fp32FloatArgs(getattr(MB, name)))
    if split:
        force_small_split(monkeypatch)
    c, dy = make_case(37, 20, 18, 3, 2, 3, 4, "uniform", 0.1, dtype=torch.float64, seed=1)
    c = c._replace(adapters=c.adapters._replace(expert_scale=0.1, user_scale=0.3))
    if split:
        c = c._replace(user_ids=torch.where(torch.arange(37) % 5 == 0, -1, 2))  # one user, 29 tokens: 2 chunks
    out = launch(c, dy, ALL)
    ref = mixture_bwd_ref(dy, c.x, *codes(c), c.weight, c.adapters, c.user_ids, ALL, num_users=c.N)
    for name, o, rf in zip(NAMES, out, ref):
        assert o.dtype == torch.float64, name
        # fp64 has no more exact oracle than the fp64 contract, so it is both ref and
        # baseline and only the floor is left: summation order costs a few hundred
        # fp64 ulps here, an fp32-rounded scale some 1e7.
        assert_close(name, o, rf, rf, ulps=4096)


# ----------------------------------------------------------------------------- split over tokens


def _split_cfg(dtype, block_t=16, split_t=32):
    """The launcher's config with a small token chunk, so tiny shapes take the split path."""
    cfg = MB.bwd_configs(3, 4, 5, dtype)
    for k in ("xty_small_m", "xty_large_m"):
        cfg[k] = dict(cfg[k], BLOCK_T=block_t, SPLIT_T=split_t)
    return cfg


def force_small_split(monkeypatch):
    """Make the backward split user segments over tokens in chunks of 16 (SPLIT_T)."""
    real = MB.bwd_configs

    def small_split(*a, **kw):
        cfg = real(*a, **kw)
        for k in ("xty_small_m", "xty_large_m"):
            cfg[k] = dict(cfg[k], BLOCK_T=16, SPLIT_T=16)
        return cfg

    monkeypatch.setattr(MB, "bwd_configs", small_split)


class _ModeSpy:
    """Stands in for ``_seg_xty_kernel``: records each launch's MODE, then runs it."""

    def __init__(self, fn):
        self.fn, self.modes = fn, []

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            self.modes.append(kw["MODE"])
            return self.fn[grid](*args, **kw)
        return launch_


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


def _xty_ref(X, Y, pl, scale, lowp):
    """(fp64, fp32) oracle: out[u] = scale * X_seg^T Y_seg, with Y rounded to X's dtype
    where the kernel's dot rounds it (``lowp``)."""
    if Y is not None and lowp:
        Y = Y.to(X.dtype)

    def xty(X, Y):
        order, seg = pl.order.long(), pl.seg_offsets.long()
        out = []
        for u in range(pl.num_users):
            idx = order[seg[u + 1]:seg[u + 2]]
            y = torch.ones(len(idx), 1, dtype=X.dtype) if Y is None else Y[idx]
            out.append(scale * X[idx].t() @ y)
        return torch.stack(out)

    return at_fp64_and_fp32(xty, X, Y)


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
    """Chunk + reduce passes vs the oracle; the split path is really taken."""
    lengths, no_user = SPLIT_CASES[name]
    cfg = _split_cfg(dtype)
    for M, Nn in XTY_DIMS:
        pl, X, Y = _xty_inputs(lengths, no_user, M, Nn, dtype)
        del xty_modes[:]
        lowp = dtype == torch.float16 and Y is not None
        out = _run_xty(pl, X, Y, cfg, lowp)
        assert xty_modes == [1, 2], xty_modes
        assert torch.isfinite(out).all(), (M, Nn)  # users without tokens get zeros, not garbage
        for u, n in enumerate(lengths):
            if n == 0:
                assert (out[u] == 0).all(), (M, Nn, u)
        assert_close(f"{(M, Nn)}", out, *_xty_ref(X, Y, pl, 0.625, lowp))


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
    single = _run_xty(pl, X, Y, MB.bwd_configs(3, 4, 5, torch.float32), False)  # T = 294 <= SPLIT_T = 512
    assert xty_modes == [0]
    refs = _xty_ref(X, Y, pl, 0.625, False)
    assert_close("split", a, *refs)
    assert_close("single pass", single, *refs)


@interp
@pytest.mark.parametrize("lengths", [[1], [0, 1, 0], [16, 16]], ids=["T1", "T1_empty_users", "T_eq_chunk"])
def test_seg_xty_short_batch_single_pass(lengths, xty_modes):
    """T <= SPLIT_T: no segment can be long, the one-pass kernel runs alone."""
    pl, X, Y = _xty_inputs(lengths, 0, 6, 19, torch.float32, seed=2)
    out = _run_xty(pl, X, Y, _split_cfg(torch.float32, block_t=16, split_t=32), False)
    assert xty_modes == [0]
    assert_close("out", out, *_xty_ref(X, Y, pl, 0.625, False))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("law", ["identical", "skewed"])
def test_launcher_with_split_matches_contract(law, dtype, monkeypatch, xty_modes):
    """The whole backward with the split forced: every per-user gradient vs the contract."""
    force_small_split(monkeypatch)
    c, dy = make_case(45, 21, 19, 3, 4, 5, 4, law, 0.1, dtype=dtype, seed=7)
    needs = applies(c)
    out = launch(c, dy, needs)
    assert xty_modes == [1, 2] * 4  # dA_u, dB_u, dV, dc
    check(out, contract(c, dy, needs), needs, c, f"[split {law} {dtype}] ")
    again = launch(c, dy, needs)
    for name, a, b in zip(NAMES, out, again):
        assert (a is None and b is None) or torch.equal(a, b), name


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERP, reason="needs CUDA and compiled (non-interpreted) kernels")
@pytest.mark.parametrize("name", ["uniform", "distinct_empty_users_topk", "skewed_top1_d111", "no_users",
                                  "no_experts"])
def test_gpu_bf16_matches_contract(name):
    c, dy = case(name, torch.float32)
    c = c.to(torch.bfloat16)
    c = c._replace(x=c.x.cuda(), weight=c.weight.cuda() if c.weight is not None else None,
                   adapters=c.adapters._replace(**{k: v.cuda() for k, v in c.adapters._asdict().items()
                                                   if torch.is_tensor(v)}),
                   user_ids=c.user_ids.cuda() if c.user_ids is not None else None)
    dy = dy.to(torch.bfloat16).cuda()
    needs = applies(c)
    check(launch(c, dy, needs), contract(c, dy, needs), needs, c, f"[{name} bf16] ")


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERP, reason="needs CUDA and compiled (non-interpreted) kernels")
def test_gpu_backward_memory_is_rank_space():
    """The backward's extra memory is O(T (K r + K + r_u)) plus the gradients: no [T, K, d]."""
    T, d, K, r, r_u, N = 4096, 1024, 8, 16, 16, 64
    c, dy = make_case(T, d, d, K, r, r_u, N, "uniform", 0.0, dtype=torch.bfloat16, seed=0, device="cuda")
    dy = dy.cuda()
    c = c._replace(adapters=c.adapters._replace(expert_scale=1.0, user_scale=1.0))
    needs = (True, False, False, True, True, True, True, True, True, True)
    launch(c, dy, needs, dx_dtype=torch.bfloat16)  # warm up / compile
    torch.cuda.synchronize()
    pl = c.plan()
    h, z, g = codes(c)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = MB.mixture_bwd(dy, c.x, h, z, g, c.weight, c.adapters, pl.order, pl.seg_offsets, needs,
                         dx_dtype=torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - start
    grads = sum(o.numel() * o.element_size() for o in out if o is not None)
    rank_space = T * (K * r + K + r_u) * 4 * 3  # code buffer + its 16-bit copies for the GEMMs, generous
    dense_tmp = 2 * T * d * 2  # dy W0 in bf16 (becomes dx) + one GEMM workspace
    assert peak <= grads + rank_space + dense_tmp + (64 << 20), (peak, grads)
