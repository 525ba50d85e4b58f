"""``python -m proper_kernels.train``: the command line of the pipeline."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .data import DataError
from .pipeline import STAGES, RunError, TrainConfig, run

__all__ = ["main", "build_parser", "config_from_args"]

DESCRIPTION = """\
Run PROPER (population -> group -> user) on a user-history dataset with a local
Hugging Face causal LM, checkpoint every stage, and write the test metrics of every
stage, overall and by user bucket, to OUT/results.json and OUT/results.md.

--data is a JSONL ({"user_id", "input", "output", "split": "train"|"test"} per line)
or a LaMP task directory (or its <split>_questions.json; the golds come from
<split>_outputs.json next to it)."""

# What --quick sets when the flag itself is not given.
QUICK = {"population_epochs": 1, "group_epochs": 1, "user_epochs": 2, "max_length": 256, "max_new_tokens": 16,
         "max_users": 100, "max_history": 32}
_DEFAULT = TrainConfig(model="", data="", output="")
DEFAULTS = {"population_epochs": _DEFAULT.epochs["population"], "group_epochs": _DEFAULT.epochs["group"],
            "user_epochs": _DEFAULT.epochs["user"], "max_length": _DEFAULT.max_length,
            "max_new_tokens": _DEFAULT.max_new_tokens, "max_users": _DEFAULT.max_users,
            "max_history": _DEFAULT.max_history}
LR = dict(_DEFAULT.lr)


def _pair(text: str):
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers E1,E2 (sparse <= E1 < medium <= E2 < rich), "
                                         f"got {text!r}") from None
    return a, b


def _stages(text: str):
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"stages are a comma list of {STAGES}, got {text!r}")
    return stages


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m proper_kernels.train", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--model", required=True, help="local Hugging Face causal LM directory")
    g.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    g.add_argument("--data", required=True, help="JSONL file, or LaMP task directory / <split>_questions.json")
    g.add_argument("--output", required=True, help="output directory (checkpoints, results.json, results.md)")
    g.add_argument("--task", help="LaMP task (LaMP-1 .. LaMP-7; default: from the outputs file), or for a JSONL "
                                  "the metric kind: classification, rating, generation (default: inferred)")
    g.add_argument("--stages", type=_stages, default=STAGES,
                   help="comma list of stages to run, in order (default population,group,user; "
                        "population,user is the pipeline without the group level)")
    g.add_argument("--quick", action="store_true",
                   help="a short run to check the setup: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (flags given explicitly win)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last completed stage")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in --output first")
    g.add_argument("--stop-after", choices=STAGES, help="stop after this stage (a later --resume continues)")

    g = ap.add_argument_group("LaMP data")
    g.add_argument("--lamp-split", choices=("train", "dev", "test"),
                   help="split to read (default: dev, else test, else train: the first with questions and outputs)")
    g.add_argument("--retrieve", type=int, default=_DEFAULT.retrieve,
                   help="put the user's K most recent profile items in front of every prompt, as LaMP's "
                        "profile-augmented prompts (default 0: the bare question)")
    g.add_argument("--retrieve-words", type=int, default=_DEFAULT.retrieve_words,
                   help="words kept of each retrieved item's text")
    g.add_argument("--max-users", type=int, help="keep the first N users only (both formats)")
    g.add_argument("--max-history", type=int, help="keep each user's N most recent history items (LaMP: by date "
                                                   "when every item has one; JSONL: the last N train lines)")

    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs of the population and group stages (default 2)")
    g.add_argument("--population-epochs", type=int)
    g.add_argument("--group-epochs", type=int)
    g.add_argument("--user-epochs", type=int, help="most epochs of the user stage (default 5; per-user early stopping)")
    g.add_argument("--lr", type=float, help="learning rate of every stage")
    for s in STAGES:
        g.add_argument(f"--{s}-lr", type=float, help=f"learning rate of the {s} stage (default {LR[s]:g})")
    g.add_argument("--weight-decay", type=float, default=_DEFAULT.weight_decay)
    g.add_argument("--grad-clip", type=float, default=_DEFAULT.grad_clip, help="gradient norm clip (0: none)")
    g.add_argument("--batch-size", type=int, default=_DEFAULT.batch_size, help="training batch (rows of many users)")
    g.add_argument("--eval-batch-size", type=int, default=_DEFAULT.eval_batch_size,
                   help="batch of the test loss and of generation")
    g.add_argument("--max-length", type=int, help="tokens per example, prompt and output (default 512)")
    g.add_argument("--max-new-tokens", type=int,
                   help="generation length of generation tasks (default 64; labels and ratings: their longest + 2)")
    g.add_argument("--prompt-format", default=_DEFAULT.prompt_format,
                   help="prompt around an input (default %(default)r)")
    g.add_argument("--chat-template", action="store_true", help="wrap inputs in the tokenizer's chat template")
    g.add_argument("--val-frac", type=float, default=_DEFAULT.val_frac,
                   help="share of each user's history for validation")
    g.add_argument("--max-val", type=int, default=_DEFAULT.max_val, help="most validation examples per user")
    g.add_argument("--patience", type=int, default=_DEFAULT.patience,
                   help="user stage: epochs without improvement before a user stops")
    g.add_argument("--min-delta", type=float, default=_DEFAULT.min_delta,
                   help="user stage: validation improvement that counts")
    g.add_argument("--seed", type=int, default=_DEFAULT.seed)

    g = ap.add_argument_group("adapters (ProperConfig)")
    g.add_argument("--population-rank", type=int, default=_DEFAULT.population_rank)
    g.add_argument("--population-alpha", type=float, default=_DEFAULT.population_alpha)
    g.add_argument("--num-experts", "-K", type=int, default=_DEFAULT.num_experts, help="group experts K")
    g.add_argument("--expert-rank", type=int, default=_DEFAULT.expert_rank)
    g.add_argument("--expert-alpha", type=float, default=_DEFAULT.expert_alpha)
    g.add_argument("--top-k", type=int, help="keep the top-k gates (default: all K)")
    g.add_argument("--user-rank", type=int, default=_DEFAULT.user_rank)
    g.add_argument("--user-alpha", type=float, default=_DEFAULT.user_alpha)
    g.add_argument("--user-embed-dim", type=int, default=_DEFAULT.user_embed_dim)
    g.add_argument("--balance-weight", type=float, default=_DEFAULT.balance_weight)
    g.add_argument("--diversity-weight", type=float, default=_DEFAULT.diversity_weight)
    g.add_argument("--target-modules", default=",".join(_DEFAULT.target_modules), help="comma list of nn.Linear names")
    g.add_argument("--backend", default=_DEFAULT.backend, choices=("auto", "reference", "torch", "triton", "cuda"))

    g = ap.add_argument_group("evaluation and machine")
    g.add_argument("--buckets", type=_pair, help="history-size edges E1,E2 of sparse / medium / rich "
                                                 "(default: tertiles over the test users)")
    g.add_argument("--no-eval-base", action="store_true", help="do not evaluate the base model")
    g.add_argument("--device", default=_DEFAULT.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=_DEFAULT.dtype, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = QUICK if args.quick else DEFAULTS

    def pick(name, given):
        return given if given is not None else base[name]

    epochs = {"population": pick("population_epochs", args.population_epochs if args.population_epochs is not None
                                 else args.epochs),
              "group": pick("group_epochs", args.group_epochs if args.group_epochs is not None else args.epochs),
              "user": pick("user_epochs", args.user_epochs)}
    lr = {s: (getattr(args, f"{s}_lr") if getattr(args, f"{s}_lr") is not None
              else (args.lr if args.lr is not None else LR[s])) for s in STAGES}
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    return TrainConfig(
        model=args.model, data=args.data, output=args.output, tokenizer=args.tokenizer, task=args.task,
        lamp_split=args.lamp_split, max_history=pick("max_history", args.max_history), retrieve=args.retrieve,
        retrieve_words=args.retrieve_words, max_users=pick("max_users", args.max_users), stages=args.stages,
        epochs=epochs, lr=lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
        population_rank=args.population_rank, population_alpha=args.population_alpha, num_experts=args.num_experts,
        expert_rank=args.expert_rank, expert_alpha=args.expert_alpha, top_k=args.top_k, user_rank=args.user_rank,
        user_alpha=args.user_alpha, user_embed_dim=args.user_embed_dim, balance_weight=args.balance_weight,
        diversity_weight=args.diversity_weight,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()), backend=args.backend,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        max_length=pick("max_length", args.max_length),
        max_new_tokens=pick("max_new_tokens", args.max_new_tokens), prompt_format=args.prompt_format,
        chat_template=args.chat_template, val_frac=args.val_frac, max_val=args.max_val, patience=args.patience,
        min_delta=args.min_delta, buckets=args.buckets, eval_base=not args.no_eval_base, seed=args.seed,
        device=args.device, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        threads=args.threads, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
        progress=progress)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run; 0 on success, 2 on a bad
    dataset, output directory or argument (the message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        run(config_from_args(args))
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
