"""The host launch code of the CUDA decode kernel (csrc/lora_mixture_decode.cu), run
through the CPU emulation on emulated devices: the launch plan per device (d_in
splits, lanes per output row, the single launch's grid), programmatic dependent
launch and when it is off (pre-sm_90, graph capture, a refused launch,
PROPER_KERNELS_DISABLE_PDL), launch errors, and the choice of the launch mode.
"""
from __future__ import annotations

import pytest
import torch

from proper_kernels.testing import DecodeRunner, assert_decode_close, make_decode_case


@pytest.mark.parametrize("device", [
    dict(sms=132, cc_major=9),
    dict(sms=132, cc_major=9, reverse=True),
    dict(sms=108, cc_major=8),
    dict(sms=3, cc_major=9),
    dict(sms=1, cc_major=8, reverse=True),
    dict(sms=132, cc_major=9, fail_pdl=True),
    dict(sms=132, cc_major=9, capturing=True),
    dict(sms=132, cc_major=9, pdl_early=False),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("launch", ["two", "one"])
def test_emulated_device_variants(emu, device, launch):
    """The launch plan (d_in splits, lanes per output row, PDL or not, the single
    launch's grid) depends on the device; every plan gives the same result, and the
    launch log shows which ran. With PDL the emulation runs the expand's first blocks
    (the resident ones, at most 64) up to their griddepcontrol.wait before the shrink
    runs: a read of the workspace before the wait would see its NaN poison."""
    emu.configure(**device)
    emu.launches(clear=True)
    x, W, b, kw = make_decode_case(T=9, d_in=1536, d_out=96, K=4, r=8, N=3, r_u=8, dtype=torch.float32,
                                   users="with_none", top_k=3)
    y, gates = DecodeRunner(str(device), launch, emu)(x, W, b, return_gates=True, **kw)
    emu.configure()
    g_ref = assert_decode_close(y, x, W, b, kw, str(device))
    torch.testing.assert_close(gates, g_ref, rtol=1e-4, atol=1e-5)
    log = emu.launches(clear=True)
    if launch == "one":
        # one cooperative launch: as many blocks as the larger phase has tiles (the
        # shrink: 2 row blocks x 2 token tiles x splits), at most 2 per SM
        assert [(e["kernel"], e["cooperative"], e["pdl"]) for e in log] == [("fused", True, False)]
        splits = {1: 1, 3: 2}.get(device["sms"], 6)
        assert log[0]["grid"] == (min(4 * splits, 2 * device["sms"]), 1, 1)
        return
    assert [entry["kernel"] for entry in log] == ["shrink", "expand"]
    shrink, expand = log
    assert shrink["block"] == expand["block"] == (256, 1, 1)
    assert shrink["grid"][1] == expand["grid"][1] == 2  # token tiles of 8
    # d_in = 1536 is 6 units of 256; ~2 waves of blocks: 2 row blocks x 2 token tiles
    # fill 3 SMs twice with 2 splits, 1 SM with 1; big GPUs take all 6.
    assert shrink["grid"][2] == {1: 1, 3: 2}.get(device["sms"], 6)
    pdl = device["cc_major"] >= 9 and not device.get("fail_pdl") and not device.get("capturing")
    assert expand["pdl"] is pdl
    blocks = expand["grid"][0] * expand["grid"][1]
    early = min(64, 2 * device["sms"], blocks) if pdl and device.get("pdl_early", True) else 0
    assert (shrink["early_blocks"], expand["early_blocks"]) == (0, early)


def test_emulated_disable_pdl_env(emu, monkeypatch):
    """PROPER_KERNELS_DISABLE_PDL=1 (read by the C++ launcher) turns PDL off on sm_90."""
    emu.configure()
    x, W, b, kw = make_decode_case(T=5, dtype=torch.float32)
    for value, pdl in (("1", False), ("0", True)):
        monkeypatch.setenv("PROPER_KERNELS_DISABLE_PDL", value)
        emu.launches(clear=True)
        y = DecodeRunner("emulated", None, emu)(x, W, b, **kw)
        assert [e["pdl"] for e in emu.launches(clear=True)] == [False, pdl]
        assert_decode_close(y, x, W, b, kw, f"DISABLE_PDL={value}")


def test_emulated_launch_error_is_raised(emu):
    """A launch the device refuses surfaces as RuntimeError naming the kernel."""
    emu.configure(max_dynamic_smem=64)
    try:
        x, W, b, kw = make_decode_case(T=3, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="expand kernel launch: cudaErrorInvalidValue"):
            DecodeRunner("emulated", None, emu)(x, W, b, **kw)
    finally:
        emu.configure()


def test_launch_mode_is_checked(emu, monkeypatch):
    """The launch mode comes from the call, else $PROPER_KERNELS_CUDA_DECODE_LAUNCH; a
    bad value names its source; "one" is the single cooperative (fused) launch."""
    x, W, b, kw = make_decode_case(T=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="launch must be 'two' or 'one', got 'three'"):
        DecodeRunner("emulated", "three", emu)(x, W, b, **kw)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_DECODE_LAUNCH", "1")
    with pytest.raises(ValueError, match="PROPER_KERNELS_CUDA_DECODE_LAUNCH must be 'two' or 'one', got '1'"):
        DecodeRunner("emulated", None, emu)(x, W, b, **kw)
    monkeypatch.setenv("PROPER_KERNELS_CUDA_DECODE_LAUNCH", "one")
    emu.configure()
    emu.launches(clear=True)
    DecodeRunner("emulated", None, emu)(x, W, b, **kw)
    assert [e["kernel"] for e in emu.launches(clear=True)] == ["fused"]
