"""Tokenising examples for a causal LM, mixed-user batches, one training epoch,
per-example test loss, and batched mixed-user generation.

An example becomes ``prompt + target`` tokens: the prompt is ``prompt_format``
filled with the input (or the tokenizer's chat template with the input as the user
turn), the target is the output followed by EOS. Only target tokens carry labels.
Over ``max_length`` the target keeps its first ``max_length // 2`` tokens and the
prompt loses its middle (its start holds the instruction, its end the answer cue).
Every batch holds the examples of many users; each row carries its user's bank row.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import Example

__all__ = ["Encoded", "Codec", "collate", "train_epoch", "example_losses", "generate_outputs", "progress_bar"]

IGNORE = -100


def progress_bar(iterable, *, enabled: bool, desc: str, total: Optional[int] = None):
    """tqdm over ``iterable`` (not shown when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: ``ids[:prompt_len]`` the prompt, the rest the target;
    ``user`` its bank row; ``index`` its position in the example list it came from."""

    ids: Tuple[int, ...]
    prompt_len: int
    user: int
    index: int


class Codec:
    """Turns examples into token ids for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int, prompt_format: str = "{input}\nAnswer:",
                 chat_template: bool = False):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")
        if not chat_template and "{input}" not in prompt_format:
            raise ValueError(f"prompt_format must contain '{{input}}', got {prompt_format!r}")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt_format = prompt_format
        self.chat_template = chat_template
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def prompt_text(self, text: str) -> str:
        if self.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.prompt_format.format(input=text)

    def prompt_ids(self, text: str) -> List[int]:
        special = not self.chat_template  # a chat template writes its own special tokens
        return list(self.tokenizer(self.prompt_text(text), add_special_tokens=special)["input_ids"])

    def target_ids(self, text: str) -> List[int]:
        lead = "" if (self.chat_template or self.prompt_format.endswith((" ", "\n"))) else " "
        ids = list(self.tokenizer(lead + text, add_special_tokens=False)["input_ids"])
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    @staticmethod
    def _fit_prompt(ids: List[int], budget: int) -> List[int]:
        if len(ids) <= budget:
            return ids
        head = budget // 2
        return ids[:head] + ids[len(ids) - (budget - head):]

    def encode(self, examples: Sequence[Example], user_index: Dict[str, int]) -> List[Encoded]:
        """Prompt + target ids of every example, within ``max_length``."""
        out = []
        for i, ex in enumerate(examples):
            target = self.target_ids(ex.output)[: self.max_length // 2]
            prompt = self._fit_prompt(self.prompt_ids(ex.input), self.max_length - len(target))
            out.append(Encoded(tuple(prompt + target), len(prompt), user_index[ex.user], i))
        return out

    def encode_prompts(self, examples: Sequence[Example], user_index: Dict[str, int],
                       max_new_tokens: int) -> List[Encoded]:
        """Prompt ids only (for generation), leaving ``max_new_tokens`` of ``max_length``."""
        budget = max(1, self.max_length - max_new_tokens)
        return [Encoded(tuple(self._fit_prompt(self.prompt_ids(ex.input), budget)), 0, user_index[ex.user], i)
                for i, ex in enumerate(examples)]


def collate(items: Sequence[Encoded], pad_id: int, device, *, left: bool = False, labels: bool = True):
    """(input_ids, attention_mask, labels or None, user_ids) of a batch, padded right
    (training) or left (generation)."""
    L = max(len(it.ids) for it in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    lab = torch.full((len(items), L), IGNORE, dtype=torch.long) if labels else None
    for r, it in enumerate(items):
        n = len(it.ids)
        sl = slice(L - n, L) if left else slice(0, n)
        ids[r, sl] = torch.tensor(it.ids, dtype=torch.long)
        mask[r, sl] = 1
        if labels:
            start = sl.start + it.prompt_len
            lab[r, start:sl.stop] = ids[r, start:sl.stop]
    users = torch.tensor([it.user for it in items], dtype=torch.long)
    return (ids.to(device), mask.to(device), lab.to(device) if labels else None, users.to(device))


def _device(pm) -> torch.device:
    return next(pm.parameters()).device


def train_epoch(pm, items: Sequence[Encoded], optimizer, batch_size: int, rng: random.Random, pad_id: int, *,
                progress: bool, desc: str, with_users: bool = True, after_step: Optional[Callable[[], None]] = None,
                grad_clip: Optional[float] = 1.0) -> float:
    """One pass over ``items`` in shuffled mixed-user batches; returns the mean batch
    loss (the model's loss: target-token CE, plus the auxiliary losses in the group
    stage). ``after_step`` runs after every optimizer step (e.g.
    ``pm.restore_frozen_users``)."""
    if not items:
        return float("nan")
    pm.train()
    dev = _device(pm)
    order = rng.sample(range(len(items)), len(items))
    params = [p for p in pm.parameters() if p.requires_grad]
    total, steps = 0.0, 0
    bar = progress_bar(range(0, len(order), batch_size), enabled=progress, desc=desc)
    for start in bar:
        batch = [items[i] for i in order[start:start + batch_size]]
        ids, mask, lab, users = collate(batch, pad_id, dev)
        out = pm(input_ids=ids, attention_mask=mask, labels=lab, user_ids=users if with_users else None)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        loss = float(out.loss.detach())
        total += loss
        steps += 1
        bar.set_postfix(loss=f"{loss:.3f}")
    pm.eval()
    return total / max(1, steps)


def _by_length(items: Sequence[Encoded]) -> List[int]:
    return sorted(range(len(items)), key=lambda i: -len(items[i].ids))


@torch.no_grad()
def example_losses(pm, items: Sequence[Encoded], batch_size: int, pad_id: int, *, progress: bool = False,
                   desc: str = "loss", with_users: bool = True) -> List[float]:
    """Mean CE (nats) of each example's target tokens, in ``items`` order."""
    was = pm.training
    pm.eval()
    dev = _device(pm)
    out = [float("nan")] * len(items)
    order = _by_length(items)
    for start in progress_bar(range(0, len(order), batch_size), enabled=progress, desc=desc):
        rows = order[start:start + batch_size]
        ids, mask, lab, users = collate([items[i] for i in rows], pad_id, dev)
        logits = pm(input_ids=ids, attention_mask=mask, user_ids=users if with_users else None).logits
        tgt = lab[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(tgt.shape)
        count = (tgt != IGNORE).sum(-1).clamp_min(1)
        for r, v in zip(rows, (ce.sum(-1) / count).tolist()):
            out[r] = v
    pm.train(was)
    return out


@torch.no_grad()
def generate_outputs(pm, tokenizer, items: Sequence[Encoded], batch_size: int, pad_id: int, max_new_tokens: int, *,
                     first_line: bool = False, progress: bool = False, desc: str = "generate",
                     with_users: bool = True) -> List[str]:
    """Greedy ``pm.generate`` of every prompt, many users per batch (left-padded),
    decoded without special tokens and stripped (cut at the first newline when
    ``first_line``), in ``items`` order."""
    was = pm.training
    pm.eval()
    dev = _device(pm)
    texts = [""] * len(items)
    order = _by_length(items)
    eos = tokenizer.eos_token_id
    for start in progress_bar(range(0, len(order), batch_size), enabled=progress, desc=desc):
        rows = order[start:start + batch_size]
        ids, mask, _, users = collate([items[i] for i in rows], pad_id, dev, left=True, labels=False)
        gen = pm.generate(input_ids=ids, attention_mask=mask, user_ids=users if with_users else None,
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                          eos_token_id=eos)
        new = gen[:, ids.shape[1]:].tolist()
        for r, seq in zip(rows, new):
            if eos is not None and eos in seq:
                seq = seq[:seq.index(eos)]
            text = tokenizer.decode(seq, skip_special_tokens=True).strip()
            if first_line:
                text = text.split("\n", 1)[0].strip()
            texts[r] = text
    pm.train(was)
    return texts
