"""Corner cases of the CUDA decode path found in review (CPU emulation of csrc/, and
the build helper). Helpers come from tests/test_cuda_decode.py."""
from __future__ import annotations

import functools

import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import cuda_decode as cd
from proper_kernels.reference import lora_mixture_ref
from test_cuda_decode import _load_build_cuda, decode_loop_ref, make_case

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu():
    try:
        return _load_build_cuda().load_emulator(ROOT)
    except RuntimeError as exc:
        pytest.skip(f"cannot build the CPU emulation: {exc}")


@pytest.fixture(params=["two", "one"])
def run(request, emu):
    emu.configure(sms=4 if request.param == "one" else 132)
    fn = functools.partial(cd.run_extension, emu, launch=request.param)

    def call(*args, **kw):
        with torch.no_grad():
            return fn(*args, **kw)

    yield call
    emu.configure()


def test_empty_user_bank(run):
    """N = 0 (user tensors with no users, every id -1) is legal: the user terms are
    zero. The kernel used to be called with r_u > 0 and no ids: RuntimeError."""
    x, W, b, kw = make_case(T=6, N=1, users="all_none", dtype=torch.float32, top_k=2)
    for name in ("user_logit_bias", "user_A", "user_B", "user_router"):
        kw[name] = kw[name][:0].contiguous()
    y, gates = run(x, W, b, return_gates=True, **kw)
    y_ref, g_ref = lora_mixture_ref(x, W, b, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-6)
