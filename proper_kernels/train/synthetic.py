"""A LaMP-format dataset and a tiny random Llama with its own tokenizer, made
offline: to try ``python -m proper_kernels.train`` without downloads, and the
fixture of its tests.

    python -m proper_kernels.train.synthetic /tmp/demo --task LaMP-2
    python -m proper_kernels.train --model /tmp/demo/model --data /tmp/demo/data/LaMP-2 --output /tmp/demo/out --quick

The data: users belong to latent groups; history sizes (profile items) are Pareto
distributed. LaMP-2 (movie tagging): a user tags mostly with its two favourite tags,
else with one of its group's tags; a description names its tag's cue word half of the
time. LaMP-3 (rating): a user's scores centre on its own mean, shifted by the
review's sentiment words. LaMP-5 (title generation): a title is two of the user's
favourite words and two words of the abstract. Some users have two questions whose
profiles overlap (one user, a growing profile), as in LaMP's time-based split.
The model knows nothing (random weights); the tokenizer is a byte-level BPE trained
on the dataset's own text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from typing import Dict, List, Sequence

from .prompts import LAMP_TASKS, Q_MOVIE, Q_PAPER_TITLE, Q_REVIEW

__all__ = ["write_lamp_task", "write_tiny_model", "dataset_texts", "TASKS", "main"]

TASKS = ("LaMP-2", "LaMP-3", "LaMP-5")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "se", "di", "pa", "gu", "fe", "zo", "bi", "ha", "ju")


def _words(rng: random.Random, n: int) -> List[str]:
    out: Dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))] = None
    return list(out)


def write_lamp_task(directory: str, task: str = "LaMP-2", num_users: int = 30, seed: int = 0, split: str = "dev",
                    pareto_alpha: float = 1.2, min_history: int = 2, max_history: int = 40, num_groups: int = 3,
                    second_question: float = 0.3) -> str:
    """Write ``{split}_questions.json`` and ``{split}_outputs.json`` of a synthetic
    ``task`` (one of TASKS) into ``directory``; returns ``directory``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = random.Random(seed)
    vocab = _words(rng, 160)
    generic, cues = vocab[:100], vocab[100:]
    tags = list(LAMP_TASKS["LaMP-2"].labels)
    cue_of = {t: cues[i] for i, t in enumerate(tags)}
    group_tags = [rng.sample(tags, 3) for _ in range(num_groups)]
    questions, golds = [], []

    def make_item(u: int, group: int, fav: Sequence[str], words: Sequence[str], mean: float, item_id: str) -> dict:
        body = rng.sample(generic, rng.randint(5, 9))
        if task == "LaMP-2":
            tag = rng.choice(fav) if rng.random() < 0.7 else rng.choice(group_tags[group])
            if rng.random() < 0.5:
                body.insert(rng.randrange(len(body) + 1), cue_of[tag])
            return {"id": item_id, "description": " ".join(body), "tag": tag}
        if task == "LaMP-3":
            good, bad = cues[0], cues[1]
            mood = rng.choice((good, bad, None))
            if mood:
                body.insert(0, mood)
            score = mean + (1 if mood == good else -1 if mood == bad else 0) + rng.choice((-1, 0, 0, 1))
            return {"id": item_id, "text": " ".join(body), "score": int(min(5, max(1, round(score))))}
        title = rng.sample(list(words), 2) + rng.sample(body, 2)
        return {"id": item_id, "abstract": " ".join(body), "title": " ".join(title)}

    def question(item: dict) -> tuple:
        if task == "LaMP-2":
            return Q_MOVIE.format(labels=", ".join(tags), description=item["description"]), item["tag"]
        if task == "LaMP-3":
            return Q_REVIEW.format(text=item["text"]), str(item["score"])
        return Q_PAPER_TITLE.format(abstract=item["abstract"]), item["title"]

    qid = 100
    for u in range(num_users):
        group = u % num_groups
        fav = rng.sample(group_tags[group], 1) + rng.sample(tags, 1)
        words = rng.sample(generic, 3)
        mean = rng.choice((2, 3, 4, 4, 5))
        n = min(max_history, int(math.ceil(min_history * rng.paretovariate(pareto_alpha))))
        profile = [make_item(u, group, fav, words, mean, f"{u}{j:03d}") for j in range(n)]
        rounds = 2 if rng.random() < second_question else 1
        for r in range(rounds):
            target = make_item(u, group, fav, words, mean, f"q{qid}")
            inp, out = question(target)
            # the later question sees a grown profile (the earlier question's item joined it)
            questions.append({"id": str(qid), "input": inp, "profile": [dict(p) for p in profile]})
            golds.append({"id": str(qid), "output": out})
            qid += 1
            if r + 1 < rounds:
                profile.append(dict(target, id=f"{u}{len(profile):03d}"))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}_questions.json"), "w", encoding="utf-8") as f:
        json.dump(questions, f)
    with open(os.path.join(directory, f"{split}_outputs.json"), "w", encoding="utf-8") as f:
        json.dump({"task": task.replace("-", "_"), "golds": golds}, f)
    return directory


def write_tiny_model(directory: str, texts: Sequence[str], *, vocab_size: int = 512, hidden: int = 32, layers: int = 2,
                     heads: int = 4, intermediate: int = 64, max_positions: int = 1024, seed: int = 0) -> str:
    """Write a random LlamaForCausalLM and a byte-level BPE tokenizer trained on
    ``texts`` (special tokens <pad>, <s> (prepended), </s>) to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory)
    return directory


def dataset_texts(directory: str) -> List[str]:
    """Every string of a LaMP split written by :func:`write_lamp_task`, the prompt
    templates' answer cue included (what the tokenizer is trained on)."""
    from .data import read_lamp

    ds = read_lamp(directory)
    return [e.input for e in ds.train + ds.test] + [e.output for e in ds.train + ds.test] + ["\nAnswer:"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proper_kernels.train.synthetic",
                                 description="Write a synthetic LaMP-format task and a tiny random Llama to try "
                                             "python -m proper_kernels.train offline.")
    ap.add_argument("output", help="directory: writes OUT/data/<task>/ and OUT/model/")
    ap.add_argument("--task", default="LaMP-2", choices=TASKS)
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = write_lamp_task(os.path.join(args.output, "data", args.task), args.task, args.users, args.seed)
    model = write_tiny_model(os.path.join(args.output, "model"), dataset_texts(data), seed=args.seed)
    print(f"data: {data}\nmodel: {model}\ntry:\n  python -m proper_kernels.train --model {model} --data {data} "
          f"--output {os.path.join(args.output, 'out')} --quick --lr 3e-3")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
