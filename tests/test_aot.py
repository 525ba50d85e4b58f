"""Ahead-of-time compile of the Triton kernels for sm_90 (no GPU needed): every kernel
compiles and the prefill / decode target configs do not spill registers; the fp32
configs on sm_90 and the bf16 / fp32 ones on sm_80 (the launchers pick them per dot
dtype and compute capability) do not spill either and fit the shared memory.

Runs ``python/aot_check.py --quick`` in a fresh process (this suite imports triton in
interpreter mode, the check needs real JITFunctions). Skipped when triton's AOT API or
ptxas is unavailable. ~10-20 s with a cold triton cache, a few seconds warm.

The tables are spill-free with the triton they were checked with (``TUNED_TRITON``,
what CI installs). Another triton compiles differently: triton 3.6 (the lent GPU
machines') spills 4-40 B in a few fp32 configs. There the spill assertions skip and
name what spilled, instead of failing (and stopping a ``-x`` run of the GPU suite).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "python", "aot_check.py")
EXIT_UNAVAILABLE = 2  # python/aot_check.py
TUNED_TRITON = (3, 9)  # the triton whose ptxas output the config tables were checked against


def _assert_spill_free(bad, out):
    """No spilling (or failing, or shared-memory-exceeding) compilation; with another
    triton than TUNED_TRITON, a skip that lists them instead."""
    import triton

    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if bad and version != TUNED_TRITON:
        pytest.skip(f"triton {triton.__version__} (tables checked with {TUNED_TRITON[0]}.{TUNED_TRITON[1]}) spills in: "
                    + "; ".join(f"{r['kernel']} {r['config']} ({r.get('spill_st')} B)" for r in bad))
    assert not bad, out


def _prereqs():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"triton AOT API unavailable: {e}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"no ptxas for sm_90: {e}"
    return None


def _aot(tmp_path_factory, arch, dtypes):
    why = _prereqs()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, SCRIPT, "--arch", str(arch), "--dtypes", dtypes, "--quick", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode == EXIT_UNAVAILABLE:
        pytest.skip(p.stderr.strip() or "AOT compile unavailable")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())
    return rows, p.stdout


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory):
    return _aot(tmp_path_factory, 90, "bf16")


@pytest.fixture(scope="module", params=[(90, "fp32"), (80, "bf16,fp32"), (120, "bf16,fp32")],
                ids=["sm90-fp32", "sm80-bf16-fp32", "sm120-bf16-fp32"])
def aot_rows_other(request, tmp_path_factory):
    return _aot(tmp_path_factory, *request.param)


def _find(rows, kernel, *needles):
    return [r for r in rows if r["kernel"] == kernel and all(n in r["config"] + " " + r["cases"] for n in needles)]


def test_every_kernel_compiles(aot_rows):
    rows, out = aot_rows
    errors = [r for r in rows if "error" in r]
    assert not errors, out
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"mixture_shrink", "mixture_expand", "mixture_bwd_rank", "mixture_bwd_dx", "seg_xty"}, kernels
    assert all(r["regs"] and r["regs"] <= 255 for r in rows), out


def test_target_configs_do_not_spill(aot_rows):
    rows, out = aot_rows
    spills = [r for r in rows if (r.get("spill_st") or 0) or (r.get("spill_ld") or 0)]
    _assert_spill_free(spills, out)
    # The configs the brief is about are really in the set.
    assert _find(rows, "mixture_expand", "HAS_W=1", "BM=128 BN=128", "w8", "prefill"), out  # fused prefill GEMM
    assert _find(rows, "mixture_expand", "HAS_W=1", "GATED=0", "BM=64 BN=64", "decode"), out  # fused decode
    assert _find(rows, "mixture_shrink", "GATES=1", "prefill"), out
    assert _find(rows, "mixture_shrink", "ATOMIC=1", "decode"), out


def test_fp32_and_sm80_configs_do_not_spill(aot_rows_other):
    rows, out = aot_rows_other
    assert not [r for r in rows if "error" in r], out
    bad = [r for r in rows if (r.get("spill_st") or 0) or (r.get("spill_ld") or 0) or r.get("smem_over")]
    _assert_spill_free(bad, out)
    # The checker really ran the launchers for that arch / dtype (not the sm_90 bf16 table).
    assert _find(rows, "mixture_bwd_rank", "bwd fp32"), out
    if "# Triton AOT check: cuda sm_80" in out:
        assert _find(rows, "mixture_bwd_rank", "BM=32 BN=32", "bwd bf16"), out
    elif "# Triton AOT check: cuda sm_120" in out:
        assert _find(rows, "mixture_bwd_rank", "BM=32 BN=64", "bwd bf16"), out  # its own rank tile
    else:
        assert _find(rows, "mixture_expand", "fwd mixture fp32 decode", "BN=32"), out


def test_config_choice_per_dtype_and_arch(monkeypatch):
    """No ptxas needed: bf16 / fp16 on sm_90 is the default table (what CPU / meta
    launches get), fp32 and sm_80 pick their own, and target_arch reaches the launchers."""
    import torch
    from proper_kernels.triton.bwd_config import bwd_configs
    from proper_kernels.triton.fwd_config import fwd_config
    from proper_kernels.runtime.target import DEFAULT_ARCH, device_arch, target_arch

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the real tables, not the interpreter's small config
    assert DEFAULT_ARCH == 90 and device_arch(torch.device("meta")) == 90 and device_arch(torch.device("cpu")) == 90
    with target_arch(80):
        assert device_arch(torch.device("meta")) == 80
    assert device_arch(torch.device("meta")) == 90
    for T in (1, 64, 8192):
        for v in ("fused", "standalone"):
            ref = fwd_config(T, 4096, 4096, 144, v)
            assert fwd_config(T, 4096, 4096, 144, v, dtype=torch.float16, arch=90) == ref
            assert fwd_config(T, 4096, 4096, 144, v, dtype=torch.bfloat16, arch=100) == ref
            assert fwd_config(T, 4096, 4096, 144, v, dtype=torch.float32) != ref
    assert fwd_config(64, 4096, 4096, 144, "fused", arch=80) != fwd_config(64, 4096, 4096, 144, "fused")
    assert bwd_configs(8, 16, 16) == bwd_configs(8, 16, 16, torch.float16, 90)
