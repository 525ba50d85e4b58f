"""benchmarks/providers.py: every way of computing the op that the benchmark times
agrees with the fp32 reference, and says why it cannot run a case."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import providers  # noqa: E402
from presets import Case, build_cases  # noqa: E402
from providers import PROVIDERS, REGISTRY  # noqa: E402
from refcheck import Oracle  # noqa: E402
from steps import make_layers, make_step, output_names  # noqa: E402

CPU = torch.device("cpu")


def _small(op, grad=False, T=19, law="zipf"):
    """An awkward small case: 19 tokens, 24 -> 40, K=3, r=4, r_u=4, 5 users."""
    mode = {"fwd": "prefill", "fwdbwd": "train", "decode": "decode", "mlp": "train" if grad else "prefill"}[op]
    return Case(0, op, mode, T, 24, 40 if op != "mlp" else 24, 3, 4, 4, 5, law, grad=grad or op == "fwdbwd",
                d_ff=40 if op == "mlp" else 0)


def _check(case, prov, dtype=torch.float32):
    layers, x, ids, pl, dy = make_layers(case, dtype, CPU, 1)
    step = make_step(case, prov, layers, x, ids, pl, dy)
    out = step()
    res = Oracle(case, layers, x, ids, pl, dy).check(prov.work, out, output_names(case, layers, prov.work), dtype)
    return res, step


@pytest.mark.parametrize("op,grad", [("fwd", False), ("fwdbwd", True), ("mlp", False), ("mlp", True)])
@pytest.mark.parametrize("name", ["base", "reference", "auto", "loop", "torch", "torch-segment"])
def test_plain_providers_match_the_reference(monkeypatch, name, op, grad):
    if name == "torch-segment":  # the per-user segment loop that large banks take
        monkeypatch.setattr(providers, "WIDE_MAX_RANK", 0)
        name = "torch"
    if name == "auto":  # what a CPU user gets: the package's torch backend, not the interpreter
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _small(op, grad)
    prov = REGISTRY[name]
    assert prov.skip_reason(case, CPU) is None
    (ok, err, tol, msg), _ = _check(case, prov)
    assert ok, msg


def test_torch_formulation_and_graph_safety(monkeypatch):
    case = _small("decode")
    torch_p = REGISTRY["torch"]
    assert torch_p.formulation(case) == "wide" and torch_p.graph_safe(case)
    assert "one-hot" in torch_p.note_for(case, None, None, None, None)
    monkeypatch.setattr(providers, "WIDE_MAX_RANK", 0)
    assert torch_p.formulation(case) == "segment" and not torch_p.graph_safe(case)
    assert "segment" in REGISTRY["torch-compile"].note_for(case, None, None, None, None)
    assert not REGISTRY["loop"].graph_safe(case) and not REGISTRY["peft"].graph_safe(case)


def test_auto_is_what_lora_mixture_takes_by_default(monkeypatch):
    """The auto provider's note is the path proper_kernels.explain reports (the torch
    backend on a CPU without the interpreter); under TRITON_INTERPRET=1 it is skipped."""
    case = _small("fwd")
    layers, x, ids, pl, _ = make_layers(case, torch.float32, CPU, 0)
    prov = REGISTRY["auto"]
    assert "Triton CPU interpreter" in prov.skip_reason(case, CPU)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert prov.skip_reason(case, CPU) is None and not prov.graph_safe(case)
    assert prov.note_for(case, layers, x, ids, pl) == "path=torch (wide)"  # N (r_u + K) = 192: a small bank


def test_peft_matches_the_reference_of_the_users_part():
    pytest.importorskip("peft")
    for op in ("decode", "mlp"):
        case = _small(op)
        (ok, _, _, msg), _ = _check(case, REGISTRY["peft"])
        assert ok, (op, msg)


def test_torch_compile_decode_bf16():
    """torch.compile of the torch formulation passes the bf16 check and times (cpu-small
    decode T=16, the case of the CLI)."""
    import timing

    case = [c for c in build_cases("cpu-small", ["decode"], None) if c.T == 16][0]
    prov = REGISTRY["torch-compile"]
    assert prov.skip_reason(case, CPU) is None
    torch._dynamo.reset()
    (ok, _, _, msg), step = _check(case, prov, torch.bfloat16)
    assert ok, msg
    med, p20, p80, timer = timing.time_fn(step, CPU, case, 1.0, prov.graph_safe(case))
    assert 0 < p20 <= med <= p80 and timer == "wall"


def test_skip_reasons_name_the_provider_and_put_the_machine_first():
    """On a CPU the GPU providers give one reason for every case (the same line in the
    skip list); op limits come after: forward-only, decode-only, PEFT in training."""
    cases = build_cases("cpu-small", ["fwd", "fwdbwd", "decode", "mlp"], None)
    for name in ("cuda", "cuda-one"):
        assert {REGISTRY[name].skip_reason(c, CPU) for c in cases} == {f"{name}: needs a CUDA device"}
    assert {REGISTRY["triton"].skip_reason(c, CPU) for c in cases} == {
        "triton: needs CUDA (TRITON_INTERPRET=1 on CPU is far too slow to time)"}
    train = [c for c in cases if c.grad]
    fwd = [c for c in cases if c.op == "fwd"]
    assert REGISTRY["cuda"].op_skip_reason(train[0]) == "cuda: forward only (no backward)"
    assert REGISTRY["cuda"].op_skip_reason(fwd[0]) == "cuda: decode kernel, only --op decode"
    assert REGISTRY["cuda-one"].op_skip_reason(fwd[0]) == "cuda-one: decode kernel, only --op decode"
    assert REGISTRY["triton"].op_skip_reason(train[0]) is None
    if providers._importable("peft"):
        assert REGISTRY["peft"].skip_reason(train[0], CPU).startswith("peft: mixed-batch adapter_names is inference-only")
        no_users = _small("decode")
        no_users.r_u = 0
        assert REGISTRY["peft"].skip_reason(no_users, CPU) == "peft: the case has no user adapters"
    for name in ("base", "reference", "loop", "torch", "torch-compile"):
        assert all(REGISTRY[name].skip_reason(c, CPU) is None for c in cases), name


def test_registry_and_work():
    assert tuple(REGISTRY) == PROVIDERS
    assert {n: p.work for n, p in REGISTRY.items() if p.work != "full"} == {"base": "base", "peft": "users"}
    assert REGISTRY["base"].note and REGISTRY["peft"].note.startswith("PEFT")


def test_triton_note_is_the_dispatch_decision(monkeypatch):
    """The triton row's note is what proper_kernels.explain says backend="triton" runs on
    the case's inputs (kernels and their variant, or the rank-space torch forward)."""
    pytest.importorskip("triton")
    from proper_kernels.runtime.target import interpreter_problem

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    case = _small("fwd")
    notes = {}
    for dtype in (torch.float32, torch.float64):
        layers, x, ids, pl, _ = make_layers(case, dtype, CPU, 0)
        notes[dtype] = REGISTRY["triton"].note_for(case, layers, x, ids, pl)
    assert notes[torch.float32] == "forward=triton variant=standalone"
    assert notes[torch.float64].startswith("forward=torch: ") and "float64" in notes[torch.float64]
