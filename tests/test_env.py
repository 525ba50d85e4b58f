"""``python -m proper_kernels.env``: versions from package metadata (nothing heavy
imported), the backends of this machine, and the path a training and an inference call
take here with the dispatch's reason."""
import os
import subprocess
import sys
import time

import pytest

from proper_kernels.env import report


def test_report_names_the_path_and_its_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PROPER_KERNELS_BACKEND", raising=False)
    info = report()
    assert info["backends cpu"][:2] == ["reference", "torch"]
    paths = {k: v for k, v in info.items() if k.startswith("path cpu")}
    assert set(paths) == {"path cpu training (float32, T=16)", "path cpu inference (float32, T=16)"}
    for line in paths.values():  # backend, then the reason choose_path gave
        assert line.startswith("torch: no Triton: x is a CPU tensor and TRITON_INTERPRET=1 is not set"), line
    import torch

    if not torch.cuda.is_available():
        assert info["devices"] == "CPU only" and "cuda decode dispatch" not in info


def test_env_command_is_quick_and_imports_no_transformers():
    code = ("import runpy, sys; runpy.run_module('proper_kernels.env', run_name='__main__'); "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("TRITON_INTERPRET", "PROPER_KERNELS_BACKEND")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "path cpu training" in proc.stdout and "torch:" in proc.stdout
    if time.time() - t0 > 5:  # a loaded CI machine may be slower: say so rather than fail
        pytest.skip(f"python -m proper_kernels.env took {time.time() - t0:.1f} s here (4 s on an idle 2-core machine)")
