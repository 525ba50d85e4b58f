"""Review tests of benchmarks/run.py: the refcheck tolerance, the GPU timer's cache
state, the output files and the CLI's handling of bad values (all run on CPU)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def _patch_provider(monkeypatch, name, provider):
    import providers
    import run

    monkeypatch.setitem(providers.REGISTRY, name, provider)
    monkeypatch.setitem(run.REGISTRY, name, provider)


# --------------------------------------------------------------------------- refcheck
@pytest.mark.parametrize("case,drop", [(3, "experts"), (4, "user_router")])
def test_bf16_refcheck_catches_a_missing_term(monkeypatch, capsys, case, drop):
    """In bf16 a provider that leaves out the whole expert mixture (or the LoRA-aware
    router) must fail the check: the tolerance may not be a sizeable fraction of |y|."""
    import providers
    import run

    class Wrong(providers.TorchProvider):
        name = "torch"

        def compose(self, case, layers, ids, plan):
            if drop == "experts":
                layers = [providers.strip_params(p, "users") for p in layers]
            else:
                layers = [dict(p, user_router=None) for p in layers]
            return super().compose(case, layers, ids, plan)

    _patch_provider(monkeypatch, "torch", Wrong())
    rc = run.main(["--op", "decode", "--case", str(case), "--providers", "torch", "--dtype", "bfloat16",
                   "--no-progress", "--rep-ms", "5"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "refcheck failed: y: max err" in out
