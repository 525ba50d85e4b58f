"""Self-tests of the CPU emulation of CUDA (csrc/emu/) that runs the decode kernel's
source on CPU tensors: each class of bug it claims to catch (csrc/emu/selftest.cpp:
deadlocks, divergent barriers and warp operations, shuffles after lane exit,
misaligned vector loads, shared-memory overflow, missing barriers, reads before the
PDL wait), its fp16 / bf16 conversions, and its portable (ucontext) fiber switch.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from proper_kernels.testing import repo_root

ROOT = repo_root()


def test_emulator_selftests(emu):
    """The emulator catches each bug class it claims to (csrc/emu/selftest.cpp)."""
    emu.configure()
    expect = {
        "divergent_barrier": "deadlock",
        "shuffle_after_exit": "live lanes",
        "mixed_warp_ops": "divergent barrier",
        "misaligned_load": "misaligned 16-byte",
        "smem_overflow": "wrote past",
    }
    assert set(emu.selftest_names()) == set(expect) | {"reduce_ok", "missing_barrier", "too_much_smem",
                                                       "pdl_wait_read", "pdl_early_read"}
    err, fault, out = emu.selftest("reduce_ok")
    assert (err, fault) == ("", "")
    assert out == [1520.0] * 32 + [496.0] * 32
    for name, words in expect.items():
        err, fault, _ = emu.selftest(name)
        assert err == "" and words in fault, (name, fault)
    assert emu.selftest("too_much_smem")[0] == "cudaErrorInvalidValue"
    # A read without the barrier that orders it sees the poison, from either side.
    for reverse, nan_at in ((False, 0), (True, 63)):
        emu.configure(reverse=reverse)
        _, fault, out = emu.selftest("missing_barrier")
        assert fault == "" and math.isnan(out[nan_at]), (reverse, out[:4], out[-4:])
    # PDL: a consumer launched with programmatic stream serialization that reads the
    # producer's output after griddepcontrol.wait gets it; before the wait it gets
    # the old memory (NaN), because the emulation runs the consumer up to its wait
    # before the producer. In plain stream order (pdl_early=False) the early read
    # would pass unnoticed.
    expected = [2.0 * i for i in range(64)]
    for pdl_early in (True, False):
        emu.configure(pdl_early=pdl_early)
        assert emu.selftest("pdl_wait_read") == ("", "", expected)
        err, fault, out = emu.selftest("pdl_early_read")
        assert (err, fault) == ("", "")
        assert all(map(math.isnan, out)) if pdl_early else out == expected
    emu.configure()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulator_conversions_match_torch(emu, dtype):
    """The emulator's float <-> fp16 / bf16 conversions round exactly as torch's (to
    nearest even): random values over the whole range, every boundary of fp16
    (subnormals, the smallest normal, overflow to inf) and ties, inf and nan."""
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,), generator=g).float()),
        torch.tensor([0.0, -0.0, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -25 * 1.0001, 2 ** -14, 2 ** -14 * (1 - 2 ** -11),
                      65504.0, 65519.99, 65520.0, -65520.0, 1e10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8,
                      1 + 3 * 2 ** -8, 3.0e38, float("inf"), float("-inf")]),
    ])
    # every fp16 / bf16 value and the midpoints between neighbours
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    exact = bits.view(dtype).float()
    exact = exact[torch.isfinite(exact)].unique()
    vals = torch.cat([vals, exact, (exact[1:] + exact[:-1]) / 2])
    out = torch.tensor(emu.round_trip(vals.tolist(), str(dtype).replace("torch.", "")))
    want = vals.to(dtype).float()
    assert torch.equal(out, want), (vals[out != want][:5], out[out != want][:5], want[out != want][:5])
    nan = emu.round_trip([float("nan")], str(dtype).replace("torch.", ""))[0]
    assert math.isnan(nan)


def test_emulator_portable_switch(emu):
    """The ucontext fiber switch (used off x86-64) passes the self-tests and a kernel
    case too; built and run in a subprocess, beside the x86-64 build."""
    code = """
import torch
from proper_kernels.testing import DecodeRunner, decode_loop_ref, load_emulator, make_decode_case
emu = load_emulator(defines=("PK_EMU_USE_UCONTEXT",))
assert emu.selftest("reduce_ok")[:2] == ("", ""), emu.selftest("reduce_ok")
assert "deadlock" in emu.selftest("divergent_barrier")[1]
x, W, b, kw = make_decode_case(T=9, d_in=300, d_out=40, dtype=torch.float32, users="with_none", top_k=2)
for launch in ("two", "one"):
    y = DecodeRunner("portable", launch, emu)(x, W, b, **kw)
    err = (y - decode_loop_ref(x, W, b, **kw)[0]).abs().max().item()
    assert err < 1e-4, (launch, err)
print("PORTABLE OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "PORTABLE OK" in proc.stdout, proc.stdout + proc.stderr
