"""Numerics of the CUDA decode kernel (csrc/, proper_kernels.ops.cuda_decode) against a
per-token fp32 loop of DESIGN.md section 1 (proper_kernels.testing.decode_loop_ref):
bf16/fp16/fp32, T in {1, 7, 64, 257}, every optional part of the mixture, out= and
accumulate=, misaligned views and inputs in NaN-padded buffers, in both launch modes
(two kernels; one cooperative kernel), in the CPU emulation of the csrc/ source
(always; csrc/emu/cuda_emu.h) and on a GPU (skipped without one), where side
streams and CUDA-graph capture are checked too. Low precision must stay within a
small multiple of the error the same-dtype torch computation makes against the fp32
loop (STYLE.md).

Elsewhere: the wrapper's arguments (test_cuda_decode_args.py), the host launcher
(test_cuda_launch.py), memory traffic (test_cuda_traffic.py), the emulator itself
(test_cuda_emulator.py), the build (test_cuda_build.py), the custom op
(test_cuda_decode_op.py).
"""
from __future__ import annotations

import pytest
import torch

from proper_kernels.ops import cuda_decode as cd
from proper_kernels.reference import lora_mixture_ref
from proper_kernels.testing import (
    DecodeRunner,
    assert_decode_close,
    call_decode,
    decode_batched_ref,
    decode_loop_ref,
    make_decode_case,
)


# ---- the oracle -----------------------------------------------------------------------


@pytest.mark.parametrize("kw_case", [dict(), dict(users="with_none", top_k=2), dict(experts=False), dict(user_lora=False)])
def test_loop_ref_matches_package_reference(kw_case):
    """The test's own loop agrees with proper_kernels.reference (CPU, fp32)."""
    x, W, b, kw = make_decode_case(**kw_case)
    y_loop, g_loop = decode_loop_ref(x, W, b, **kw)
    y_ref, g_ref = call_decode(lora_mixture_ref, x, W, b, **kw)
    torch.testing.assert_close(y_loop, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_batched_ref(x, W, b, **kw), y_ref, rtol=1e-5, atol=1e-5)
    if g_ref is not None:
        torch.testing.assert_close(g_loop, g_ref, rtol=1e-5, atol=1e-6)


# ---- the kernel: on a GPU, and in the CPU emulation -----------------------------------
#
# Every kernel test runs twice: "emulated" executes the csrc/ source itself on CPU
# tensors through the emulation build (python/build_cuda.py --emulate, see
# csrc/emu/cuda_emu.h), so CI runs the kernel's indexing, barriers and shuffles on
# every change; "cuda" runs the built extension on a GPU and skips without one.

needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and cd.available()),
    reason="needs a CUDA device and the built extension proper_kernels._C",
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# (where, launch mode). The emulated single launch runs on a 4-SM device: a grid of at
# most 8 co-resident blocks, so the blocks loop over several tiles of each phase.
@pytest.fixture(params=[
    pytest.param(("emulated", "two"), id="emulated"),
    pytest.param(("emulated", "one"), id="emulated-one"),
    pytest.param(("cuda", "two"), id="cuda", marks=[pytest.mark.gpu, needs_kernel]),
    pytest.param(("cuda", "one"), id="cuda-one", marks=[pytest.mark.gpu, needs_kernel]),
])
def run(request):
    where, launch = request.param
    if where == "cuda":
        return DecodeRunner("cuda" + ("-one" if launch == "one" else ""), launch)
    return DecodeRunner.emulated(request.getfixturevalue("emu"), launch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("users", ["distinct", "identical", "with_none"])
def test_kernel_full_mixture(run, dtype, T, users):
    x, W, b, kw = make_decode_case(T=T, d_in=256, d_out=192, K=4, r=8, N=5, r_u=8, dtype=dtype,
                                   device=run.device, users=users, seed=T)
    y, gates = run(x, W, b, return_gates=True, **kw)
    assert y.dtype == dtype and y.shape == (T, 192)
    g_ref = assert_decode_close(y, x, W, b, kw, f"{dtype} T={T} {users}")
    assert gates.dtype == torch.float32 and gates.shape == (T, 4)
    torch.testing.assert_close(gates, g_ref, rtol=1e-3, atol=1e-4 if dtype == torch.float32 else 2e-3)


CONFIGS = {
    "K=1": dict(K=1),
    "top_k=2": dict(K=6, top_k=2),
    "top_k=1": dict(K=3, top_k=1),
    "no experts": dict(experts=False),
    "no users": dict(user_lora=False, user_bias=False, user_router=False),
    "uniform gates (no router input)": dict(router=False, user_bias=False, user_router=False),
    "user bias only": dict(user_lora=False, user_router=False, router=False),
    "all users -1": dict(users="all_none"),
    "no base (out-of-place)": dict(weight=False, bias=False),
    "bias only base": dict(weight=False),
    "odd sizes (scalar path)": dict(d_in=111, d_out=99, r=3, r_u=5),
    "8-byte vectors": dict(d_in=100, d_out=64, r=4, r_u=4),
    "large d, K=8 r=16": dict(d_in=2048, d_out=1024, K=8, r=16, r_u=16, N=3),
    "K=40 (two logits per lane)": dict(K=40, r=2, top_k=7, d_in=64, d_out=48),
    "at the limits: K=64, K*r+r_u+K=1024": dict(K=64, r=14, r_u=64, top_k=5, d_in=64, d_out=40),
    "nothing but base": dict(experts=False, user_lora=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernel_configs(run, dtype, T, config):
    if run.device == "cpu" and T == 257 and config.startswith("large"):
        pytest.skip("emulated: the large shape is covered at T <= 64")
    if run.name == "emulated-one" and T > 7:
        pytest.skip("emulated: the single launch runs the same tile code; its T > 7 cases are in test_kernel_full_mixture")
    x, W, b, kw = make_decode_case(**dict(dict(T=T, d_in=128, d_out=160, dtype=dtype, device=run.device, seed=T),
                                   **CONFIGS[config]))
    y, gates = run(x, W, b, return_gates=True, **kw)
    g_ref = assert_decode_close(y, x, W, b, kw, f"{config} {dtype} T={T}")
    if g_ref is None:
        assert gates is None
    else:
        torch.testing.assert_close(gates, g_ref, rtol=1e-3, atol=2e-3)
        if kw.get("top_k"):
            assert ((gates > 0).sum(-1) == kw["top_k"]).all()


def test_kernel_out_and_int32_ids(run):
    x, W, b, kw = make_decode_case(T=19, d_in=256, d_out=128, dtype=torch.bfloat16, device=run.device, users="with_none")
    kw["user_ids"] = kw["user_ids"].int()
    out = torch.full((19, 128), float("nan"), dtype=torch.bfloat16, device=run.device)
    y = run(x, W, b, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert_decode_close(y, x, W, b, kw, "out=")


@pytest.mark.parametrize("base", ["none", "weight", "bias"])
def test_kernel_accumulate(run, base):
    """accumulate=True adds into out (the add-into-y variant): out0 + the whole result."""
    x, W, b, kw = make_decode_case(T=13, d_in=96, d_out=80, dtype=torch.float32, device=run.device, users="with_none",
                                   weight=base == "weight", bias=base != "none")
    out0 = torch.randn(13, 80, generator=torch.Generator().manual_seed(1)).to(run.device)
    out = out0.clone()
    y = run(x, W, b, out=out, accumulate=True, **kw)
    assert y.data_ptr() == out.data_ptr()
    y_ref, _ = decode_loop_ref(x, W, b, **kw)
    torch.testing.assert_close(y, out0 + y_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="accumulate=True adds into out"):
        run(x, W, b, accumulate=True, **kw)


def test_kernel_misaligned_views(run):
    """A view at an odd element offset forces the scalar load path."""
    x, W, b, kw = make_decode_case(T=5, d_in=128, d_out=64, dtype=torch.float16, device=run.device)
    buf = torch.randn(5 * 128 + 1, dtype=torch.float16, device=run.device)
    x = buf[1:].view(5, 128)
    y = run(x, W, b, **kw)
    assert_decode_close(y, x, W, b, kw, "misaligned")


def _padded(t, offset, pad=64, fill=float("nan")):
    """A copy of t living `offset` elements into a buffer padded with `fill` on both sides."""
    buf = torch.full((offset + t.numel() + pad,), fill if t.is_floating_point() else -7, dtype=t.dtype)
    view = buf[offset: offset + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


@pytest.mark.parametrize("offset", [64, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_no_out_of_bounds(emu, offset, dtype):
    """Every input sits in a NaN-padded buffer (a read past any edge makes the output
    NaN), the output in a sentinel-padded one (a write past it shows)."""
    emu.configure()
    x, W, b, kw = make_decode_case(T=11, d_in=72, d_out=40, K=3, r=4, N=4, r_u=4, dtype=dtype, users="with_none", top_k=2)
    keep = []
    x = _padded(x, offset)[1]
    for name in ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router"):
        buf, kw[name] = _padded(kw[name], offset)
        keep.append(buf)
    ids_buf, kw["user_ids"] = _padded(kw["user_ids"].int(), offset)
    out_buf = torch.full((offset + 11 * 40 + 64,), 123.0, dtype=dtype)
    out = out_buf[offset: offset + 11 * 40].view(11, 40)
    y, gates = DecodeRunner("emulated", None, emu)(x, W, b, out=out, return_gates=True, **kw)
    assert_decode_close(y, x, W, b, kw, f"padded offset={offset}")
    assert (out_buf[:offset] == 123.0).all() and (out_buf[offset + 11 * 40:] == 123.0).all()
    assert torch.isfinite(gates).all()


@needs_kernel
@pytest.mark.gpu
def test_kernel_side_stream():
    x, W, b, kw = make_decode_case(T=19, d_in=256, d_out=128, dtype=torch.bfloat16, device="cuda", users="with_none")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        y = call_decode(cd.lora_mixture_decode_cuda, x, W, b, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert_decode_close(y, x, W, b, kw, "side stream")


@needs_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["two", "one"])
def test_kernel_cuda_graph_capture(launch):
    """Captured into a CUDA graph (with a plan: no host sync) and replayed on new x."""
    import proper_kernels as pk

    x, W, b, kw = make_decode_case(T=16, d_in=256, d_out=128, dtype=torch.bfloat16, device="cuda", users="with_none")
    plan = pk.plan(kw["user_ids"], 5)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            call_decode(cd.lora_mixture_decode_cuda, static_x, W, b, plan=plan, launch=launch, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = call_decode(cd.lora_mixture_decode_cuda, static_x, W, b, plan=plan, launch=launch, **kw)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert_decode_close(y, x2, W, b, kw, f"graph replay, launch={launch}")


@needs_kernel
@pytest.mark.gpu
def test_kernel_rejects_grad_and_cpu():
    x, W, b, kw = make_decode_case(T=3, dtype=torch.float32, device="cuda")
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        call_decode(cd.lora_mixture_decode_cuda, x, W, b, **kw)
    with pytest.raises(ValueError, match="device"):
        call_decode(cd.lora_mixture_decode_cuda, x, W.detach().cpu(), b, **kw)


@needs_kernel
@pytest.mark.gpu
def test_extension_reports():
    archs = cd.built_archs()
    assert any(a.startswith("sm_") for a in archs)
    ext = cd._load()
    assert ext.MAX_TOKENS == cd.MAX_TOKENS and ext.MAX_EXPERTS == cd.MAX_EXPERTS
    assert ext.MAX_RANK_TOTAL == cd.MAX_RANK_TOTAL
    assert ext.EMULATED is False
