"""benchmarks/e2e.py: whole model steps (stage-3 training, generation) of PROPER and
its baselines on a tiny random Llama."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import e2e  # noqa: E402
from presets import Case, build_cases  # noqa: E402

CPU = torch.device("cpu")


def _needs_integration():
    why = e2e.integration_skip_reason()
    if why:
        pytest.skip(why)


def test_e2e_prompts_hold_no_pad_token():
    """generate(pad_token_id=0) without an attention mask masks every token equal to 0
    (transformers infers the mask from the pad id): random prompts must avoid it."""
    _needs_integration()
    case = [c for c in build_cases("cpu-small", ["e2e"], None) if c.mode == "generate"][0]
    case.N = 64
    case.T = 64  # 64 x 64 tokens of a 256-token vocabulary: a 0 is all but certain without the fix
    _, _, ids, _, cfg = e2e.build(case, CPU, torch.float32)
    assert ids.shape == (64, 64) and int(ids.min()) >= 1 and int(ids.max()) < cfg["vocab_size"]


def test_peft_generation_raises_no_future_warning():
    """PEFT's PeftModel reads model.is_gradient_checkpointing, deprecated by
    transformers 5 with a FutureWarning: the benchmark run must not print it."""
    _needs_integration()
    pytest.importorskip("peft")
    case = Case(0, "e2e", "generate", 4, 0, 0, 2, 4, 4, 2, "distinct", grad=False, new_tokens=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = e2e.make_fn(case, "peft", "generate", CPU, torch.float32)
        out = step()
    assert out.shape == (2, 2 + 2)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_rates_and_notes():
    train, gen = build_cases("cpu-small", ["e2e"], None)
    assert e2e.loop_users(train) == 8 < train.N
    assert e2e.tokens_per_step(train, "train-step", "proper") == train.N * train.T
    assert e2e.tokens_per_step(train, "train-step", "loop") == 8 * train.T
    assert e2e.tokens_per_step(gen, "generate", "peft") == gen.N * gen.new_tokens
    assert e2e.provider_note(train, "loop").endswith("8 of 64 users timed")
    assert e2e.provider_note(gen, "peft").startswith("PEFT")
    assert e2e.E2E_PROVIDERS == {"train-step": ("proper", "loop"), "generate": ("proper", "peft")}
