"""Tiny Hugging Face models, adapters and data for the integration tests.

Tiny random causal LMs, adapters and data for the tests of proper_kernels.integrations.
transformers, peft and the integration package are imported inside the functions.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

__all__ = ["TINY_VOCAB", "tiny_causal_lm", "tiny_proper_config", "randomize_adapters", "trained_proper_model",
           "left_pad", "random_token_seqs", "counting_corpus", "collate_lm", "tiny_training_args",
           "random_peft_lora"]

TINY_VOCAB = 97
ADAPTER_B_NAMES = ("population_B", "expert_B", "user_B", "user_router", "user_embedding")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, *, tie_word_embeddings: bool = False):
    """A random 2-layer ``arch`` ("llama", "qwen2" or "mistral") causal LM in eval mode:
    hidden 32, MLP 48, 4 heads, 2 kv heads, vocab :data:`TINY_VOCAB`, pad 0, bos 1, eos 2."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings)
    if arch == "mistral":
        cfg.sliding_window = None
    return model_cls(cfg).eval()


def tiny_proper_config(**overrides):
    """A ProperConfig sized for :func:`tiny_causal_lm`: 3 experts of rank 2, 4 users of
    rank 2, user embeddings of 4, population rank 4 (every alpha = 2 * rank), the
    reference backend; ``overrides`` replace any field."""
    from proper_kernels.integrations import ProperConfig

    fields = dict(num_experts=3, expert_rank=2, expert_alpha=4.0, num_users=4, user_rank=2, user_alpha=4.0,
                  user_embed_dim=4, population_rank=4, population_alpha=8.0, backend="reference")
    fields.update(overrides)
    return ProperConfig(**fields)


@torch.no_grad()
def randomize_adapters(pm, seed: int = 1, scale: float = 0.3, names=ADAPTER_B_NAMES) -> None:
    """Give the adapter tensors ``names`` of every adapted layer of ``pm`` random
    N(0, scale^2) values, as after training (by default the ones that start at zero:
    every B, V_u, and e_u). Parts a layer does not have are skipped."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in pm.adapted_layers():
        for name in names:
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trained_proper_model(arch: str = "llama", **config_overrides):
    """(ProperModel of a :func:`tiny_causal_lm` in the user stage, every stage's
    adapters random; an untouched copy of the base model, for reloading)."""
    import copy

    from proper_kernels.integrations import get_proper_model

    base = tiny_causal_lm(arch)
    orig = copy.deepcopy(base)
    pm = get_proper_model(base, tiny_proper_config(**config_overrides))
    for seed, stage in enumerate(("population", "group", "user"), start=1):
        pm.set_stage(stage)
        randomize_adapters(pm, seed=seed)
    return pm, orig


def left_pad(seqs, pad: int = 0):
    """(input_ids, attention_mask, position_ids), each int64 [len(seqs), longest], of
    token lists padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def random_token_seqs(lengths, seed: int = 0) -> list:
    """One list of random token ids in [3, TINY_VOCAB) per length (0-2 are pad, bos, eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def counting_corpus(n: int = 32, L: int = 10, seed: int = 0) -> list:
    """``n`` rows ``{"input_ids": int64 [L], "user_ids": u}`` of two users with opposite
    habits: user 0 counts up from a random start, user 1 counts down."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        u = i % 2
        start = int(torch.randint(10, 80, (1,), generator=g))
        step = 1 if u == 0 else -1
        rows.append({"input_ids": torch.tensor([start + step * j for j in range(L)]), "user_ids": u})
    return rows


def collate_lm(rows) -> Dict[str, Tensor]:
    """A batch (input_ids, labels = input_ids, user_ids) of :func:`counting_corpus` rows."""
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "user_ids": torch.tensor([r["user_ids"] for r in rows])}


def tiny_training_args(output_dir, **overrides):
    """``transformers.TrainingArguments`` for a few CPU steps: batch 8, no saving, no
    logging, no reporting, every column kept for ProperModel's user_ids."""
    from transformers import TrainingArguments

    kw = dict(output_dir=str(output_dir), per_device_train_batch_size=8, save_strategy="no", logging_strategy="no",
              report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def random_peft_lora(base, r: int, alpha: float, target_modules=("gate_proj", "up_proj", "down_proj"), *,
                     use_rslora: bool = False, seed: int = 5):
    """``peft.get_peft_model(base, LoraConfig(...))`` (``base`` is wrapped in place)
    with random lora_B weights (N(0, 0.09)), so the adapter changes the output; eval mode."""
    import peft

    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                           task_type="CAUSAL_LM", use_rslora=use_rslora)
    model = peft.get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()

