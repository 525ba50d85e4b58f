"""End-to-end model steps: tokens/s of PROPER training and generation on a Llama.

Three measurements, each one row:

* ``proper`` / ``train-step``: one stage-3 training step (forward, backward, AdamW)
  over all users in one mixed batch (one row per user).
* ``loop`` / ``train-step``: one user at a time (gradient accumulation over
  per-user forward/backward passes, one optimiser step); presets may time only the
  first ``loop_users`` of the N users per step (tokens/s is a rate).
* ``proper`` / ``generate``: greedy generation for all users in one batch.
* ``peft`` / ``generate``: the same with HF PEFT's mixed batch (one LoRA per user on
  the same projections, ``adapter_names=``; no experts, so less work per token).

Uses ``proper_kernels.integrations`` (ProperConfig, get_proper_model, set_stage) and
transformers/peft, all imported lazily; whatever is missing is reported as a skip.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from typing import Callable, Dict, Optional

import torch

E2E_PROVIDERS = {"train-step": ("proper", "loop"), "generate": ("proper", "peft")}


def tiny_llama_config(gpu: bool) -> Dict[str, int]:
    """A tiny random Llama for CPU, a ~1B-like one (TinyLlama shapes) on GPU."""
    if gpu:
        return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    return dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def integration_skip_reason() -> Optional[str]:
    for mod in ("transformers",):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001
            return f"e2e: {mod} not importable ({exc})"
    try:
        integ = importlib.import_module("proper_kernels.integrations")
    except Exception as exc:  # noqa: BLE001
        return f"e2e: proper_kernels.integrations not importable ({type(exc).__name__}: {exc})"
    missing = [n for n in ("ProperConfig", "get_proper_model") if not hasattr(integ, n)]
    if missing:
        return f"e2e: proper_kernels.integrations has no {', '.join(missing)} (not written yet)"
    return None


def provider_skip_reason(provider: str) -> Optional[str]:
    """Why one e2e provider cannot run here (beyond :func:`integration_skip_reason`), or None."""
    if provider == "peft":
        try:
            importlib.import_module("peft")
        except ImportError:
            return "peft: not installed"
    return None


def provider_note(case, provider: str) -> str:
    """What an e2e row measures."""
    if provider == "peft":
        return "PEFT: users' LoRAs only (no experts)"
    if provider == "loop":
        n = loop_users(case)
        return "one user at a time (grad accumulation)" + (f"; {n} of {case.N} users timed" if n < case.N else "")
    return "all users in one mixed batch"


def _make(cls, **want):
    """Construct ``cls`` with the keywords it accepts (the config's field names may vary)."""
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
    else:
        names = set(inspect.signature(cls).parameters)
    return cls(**{k: v for k, v in want.items() if k in names})


def build(case, device: torch.device, dtype: torch.dtype):
    """(base model factory, proper model, inputs) for an e2e case."""
    import transformers

    integ = importlib.import_module("proper_kernels.integrations")
    cfg_kw = tiny_llama_config(device.type == "cuda")
    torch.manual_seed(0)

    def base():
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg_kw))
        return m.to(device=device, dtype=dtype)

    pcfg = _make(integ.ProperConfig, num_users=case.N, num_experts=case.K, expert_rank=case.r,
                 expert_alpha=2.0 * case.r, user_rank=case.r_u, user_alpha=2.0 * case.r_u,
                 target_modules=("gate_proj", "up_proj", "down_proj"), user_embed_dim=16, population_rank=0)
    pm = integ.get_proper_model(base(), pcfg)
    pm = pm.to(device=device)
    # Stage 3 ("user") comes after the group stage; only the per-user parts train.
    pm.set_stage("group")
    pm.set_stage("user")
    g = torch.Generator().manual_seed(0)
    # Token ids from 1: generate(pad_token_id=0) with no attention mask masks every 0.
    ids = torch.randint(1, cfg_kw["vocab_size"], (case.N, case.T), generator=g).to(device)
    users = torch.arange(case.N, device=device)
    return base, pm, ids, users, cfg_kw


def _randomise_user_B(pm):
    """Stage 3 starts with B_u = 0; give them values so generation exercises them."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "user_B" in name or "expert_B" in name:
                p.normal_(0, 0.02)


def make_fn(case, provider: str, mode: str, device, dtype) -> Callable[[], object]:
    """The timed step of one e2e measurement (training or generation)."""
    base, pm, ids, users, cfg_kw = build(case, device, dtype)
    if mode == "train-step":
        params = [p for p in pm.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the PROPER model has no trainable parameters at stage 3")
        opt = torch.optim.AdamW(params, lr=1e-4)
        if hasattr(pm, "train"):
            pm.train()

        if provider == "proper":
            def step():
                opt.zero_grad(set_to_none=True)
                out = pm(input_ids=ids, labels=ids, user_ids=users)
                out.loss.backward()
                opt.step()
        else:
            n = loop_users(case)

            def step():
                opt.zero_grad(set_to_none=True)
                for u in range(n):
                    out = pm(input_ids=ids[u:u + 1], labels=ids[u:u + 1], user_ids=users[u:u + 1])
                    (out.loss / n).backward()
                opt.step()
        return step

    prompt = ids[:, : max(1, case.T // 2)]
    gen = dict(max_new_tokens=case.new_tokens, do_sample=False, min_new_tokens=case.new_tokens)
    if provider == "proper":
        _randomise_user_B(pm)
        if hasattr(pm, "eval"):
            pm.eval()

        def step():
            with torch.no_grad():
                return pm.generate(input_ids=prompt, user_ids=users, pad_token_id=0, **gen)
        return step

    from peft import LoraConfig, get_peft_model

    model = base()
    targets = ["gate_proj", "up_proj", "down_proj"]
    lcfg = LoraConfig(r=case.r_u, lora_alpha=2 * case.r_u, lora_dropout=0.0, target_modules=targets,
                      init_lora_weights=False)
    with warnings.catch_warnings():
        # peft's PeftModel reads model.is_gradient_checkpointing, which transformers >= 5
        # deprecates with a FutureWarning: not ours to fix, and not worth a line per run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lcfg, adapter_name="u0")
    for u in range(1, case.N):
        model.add_adapter(f"u{u}", lcfg)
    model = model.to(device=device, dtype=dtype).eval()
    names = [f"u{u}" for u in range(case.N)]

    def step():
        with torch.no_grad():
            return model.generate(input_ids=prompt, adapter_names=names, pad_token_id=0, **gen)
    return step


def loop_users(case) -> int:
    """How many users the one-at-a-time loop runs per timed step (a rate: tokens/s
    does not depend on how many of the N per-user passes are timed)."""
    return min(case.loop_users, case.N) if case.loop_users else case.N


def tokens_per_step(case, mode: str, provider: str = "proper") -> int:
    if mode == "train-step":
        return (loop_users(case) if provider == "loop" else case.N) * case.T
    return case.N * case.new_tokens
