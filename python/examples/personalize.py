"""The PROPER pipeline end to end on a synthetic multi-user corpus, on CPU.

    python python/examples/personalize.py --oppu     # about a minute
    python python/examples/personalize.py --quick    # under 30 s

The corpus: every user belongs to one of G latent groups. A user's text is a Markov
chain over the vocabulary; from the current token c the next token is

* with prob. p_task  the task map f_task(c), common to all users      (population)
* with prob. p_group one of the 6 topic tokens of the user's group     (group)
* with prob. p_user  one of the user's 2 favourite tokens                (user)
* otherwise          a draw from a generic bigram table T[c]             ("language")

History sizes (sequences per user) are Pareto distributed; each user also has a few
held-out sequences. A tiny random Llama is first pretrained on generic text (T
only), standing in for the pretrained LLM. Then the three stages run:
population LoRA (merged), group experts + user-aware router + user embeddings,
user LoRAs + LoRA-aware router (all users in mixed batches). After each stage the
held-out loss is measured overall and per history bucket (sparse / medium / rich).

The user stage uses per-user early stopping: each user's training history is split
into training and validation sequences (the held-out test sequences are never used),
the per-user validation loss is measured before the stage (the group-stage
parameters) and after every epoch, each user keeps the rows of its best epoch, and a
user that has not improved for ``--patience`` epochs is frozen at its best
(``ProperModel.freeze_users``). So no user ends the stage with a higher validation
loss than the group stage gave it.
With ``--oppu`` the population -> user pipeline without the group stage (OPPU) is
run too, for comparison.

With ``--distributed``, under torchrun, the three stages run on every rank with the
users sharded by rank (``pm.shard_users``: rank r holds the users u with
u % world_size == r, and a ``UserShardSampler`` sends each user's sequences there),
DistributedDataParallel over the shared parameters (population LoRA, experts,
routers, W_e; the balance loss over the global batch) and the lazy per-user AdamW
(``pm.make_optimizer``) on the user rows; the user stage runs a fixed number of
epochs. gloo on CPU, nccl on GPUs (one per rank)::

    torchrun --nproc_per_node 2 python/examples/personalize.py --distributed --quick [--save DIR]
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proper_kernels.integrations import ProperConfig, get_proper_model
from proper_kernels.train.early_stopping import PerUserEarlyStopping

SPECIAL = 2  # 0 = pad, 1 = bos; content tokens are [SPECIAL, vocab)


@dataclass
class Corpus:
    vocab: int
    seq_len: int
    user_group: List[int]
    train: List[tuple]  # (user, tokens [seq_len])
    heldout: List[tuple]
    history: List[int]  # training sequences per user
    generic: torch.Tensor  # [n, seq_len] generic text for "pretraining"


def make_corpus(num_users=48, num_groups=4, vocab=64, seq_len=24, heldout_per_user=3, max_history=100,
                pareto_alpha=1.2, min_history=3, p_task=0.2, p_group=0.35, p_user=0.2, group_tokens=6,
                user_tokens=2, generic_seqs=3000, seed=0) -> Corpus:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    content = list(range(SPECIAL, vocab))
    # generic bigram table: each token has 4 likely successors
    T = torch.full((vocab, vocab), 1e-3)
    for c in content:
        for s in rng.sample(content, 4):
            T[c, s] += rng.uniform(0.5, 1.0)
    T[:, :SPECIAL] = 0
    T = T / T.sum(-1, keepdim=True)
    perm = content[:]
    rng.shuffle(perm)
    f_task = {c: perm[i] for i, c in enumerate(content)}
    group_topic = [rng.sample(content, group_tokens) for _ in range(num_groups)]
    user_group = [u % num_groups for u in range(num_users)]
    rng.shuffle(user_group)
    favourites = [rng.sample(content, user_tokens) for _ in range(num_users)]

    def sample_seq(u=None):
        c = rng.choice(content)
        out = [c]
        for _ in range(seq_len - 1):
            r = rng.random()
            if u is None:
                c = int(torch.multinomial(T[c], 1, generator=g))
            elif r < p_task:
                c = f_task[c]
            elif r < p_task + p_group:
                c = rng.choice(group_topic[user_group[u]])
            elif r < p_task + p_group + p_user:
                c = rng.choice(favourites[u])
            else:
                c = int(torch.multinomial(T[c], 1, generator=g))
            out.append(c)
        return torch.tensor(out)

    history = [min(max_history, int(math.ceil(min_history * rng.paretovariate(pareto_alpha)))) for _ in range(num_users)]
    train = [(u, sample_seq(u)) for u in range(num_users) for _ in range(history[u])]
    heldout = [(u, sample_seq(u)) for u in range(num_users) for _ in range(heldout_per_user)]
    generic = torch.stack([sample_seq() for _ in range(generic_seqs)])
    return Corpus(vocab, seq_len, user_group, train, heldout, history, generic)


def bucket_of(n: int) -> str:
    return "sparse" if n <= 6 else ("medium" if n <= 24 else "rich")


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def pretrain(model, generic: torch.Tensor, steps: int, bs: int = 32, lr: float = 3e-3, progress: bool = True):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="pretrain base (generic text)", leave=False, disable=not progress):
        idx = torch.randint(0, generic.shape[0], (bs,))
        batch = generic[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def train_stage(pm, data, epochs: float, lr: float, bs: int, desc: str, with_users: bool = True, wd: float = 0.0):
    """A plain loop: shuffled mixed-user batches of the training sequences."""
    pm.train()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=lr, weight_decay=wd)
    steps = max(1, round(epochs * len(data) / bs))
    order: List[int] = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        if len(order) < bs:
            order += random.sample(range(len(data)), len(data))
        idx, order = order[:bs], order[bs:]
        ids = torch.stack([data[i][1] for i in idx])
        users = torch.tensor([data[i][0] for i in idx]) if with_users else None
        out = pm(input_ids=ids, labels=ids, user_ids=users)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    pm.eval()


@torch.no_grad()
def per_user_loss(pm, data: List[tuple], with_users: bool = True, bs: int = 64) -> Dict[int, float]:
    """Mean next-token CE of each user's sequences in ``data`` ((user, tokens) pairs)."""
    was_training = pm.training
    pm.eval()
    dev = next(pm.parameters()).device
    per_user: Dict[int, List[float]] = {}
    for i in range(0, len(data), bs):
        chunk = data[i:i + bs]
        ids = torch.stack([t for _, t in chunk]).to(dev)
        users = torch.tensor([u for u, _ in chunk], device=dev)
        logits = pm(input_ids=ids, user_ids=users if with_users else None).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                             reduction="none").view(len(chunk), -1).mean(-1)
        for (u, _), v in zip(chunk, ce.tolist()):
            per_user.setdefault(u, []).append(v)
    pm.train(was_training)
    return {u: sum(v) / len(v) for u, v in per_user.items()}


def heldout_loss(pm, corpus: Corpus, with_users: bool = True) -> Dict[int, float]:
    """Mean next-token CE of each user's held-out (test) sequences."""
    return per_user_loss(pm, corpus.heldout, with_users)


def split_validation(data: List[tuple], frac: float = 0.2, max_val: int = 10, seed: int = 0):
    """Per-user validation split of the TRAINING history (the held-out test sequences
    are never touched). A user with n >= 2 sequences gives
    clamp(round(frac * n), 1, max_val) of them to validation (so at least one stays
    for training); a user with n < 2 gives none and is not trained in the user stage
    (keeps the group-stage parameters). Uses its own RNG, so the other stages' data
    order is unchanged. Returns (train, val)."""
    rng = random.Random(1000003 + seed)
    by_user: Dict[int, List[int]] = {}
    for i, (u, _) in enumerate(data):
        by_user.setdefault(u, []).append(i)
    val_idx = set()
    for u, idx in by_user.items():
        n = len(idx)
        k = 0 if n < 2 else min(n - 1, max(1, min(max_val, round(frac * n))))
        val_idx.update(rng.sample(idx, k))
    return ([d for i, d in enumerate(data) if i not in val_idx],
            [d for i, d in enumerate(data) if i in val_idx])


def train_users_early_stopping(pm, train: List[tuple], val: List[tuple], max_epochs: int, lr: float, bs: int,
                               desc: str, patience: int = 2, min_delta: float = 0.0) -> Dict[str, object]:
    """The user stage with per-user early stopping on a validation split
    (:class:`proper_kernels.train.early_stopping.PerUserEarlyStopping`).

    Epoch 0 is the model as the user stage finds it (the group-stage parameters;
    with a fresh bank B_u = 0 and V_u = 0, so the group-stage output). After each epoch every active user's
    validation loss is measured; a user that improved by more than ``min_delta``
    gets its rows (e_u, A_u, B_u, V_u of every layer) snapshotted as its best; a user
    that has not improved for ``patience`` epochs is set back to its best rows and
    frozen (``pm.freeze_users``): its sequences leave the training set and
    ``pm.restore_frozen_users()`` after each optimizer step keeps its rows exact.
    Users without validation data are frozen from the start. At the end every user
    holds its best rows, so no user's validation loss is above its group-stage one.
    Only the per-user rows are copied, never the model."""
    val_users = {u for u, _ in val}
    es = PerUserEarlyStopping(pm, val_users, patience=patience, min_delta=min_delta)
    es.start(per_user_loss(pm, val))                       # epoch 0 = group-stage parameters
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
    pm.train()
    for epoch in range(1, max_epochs + 1):
        active = set(es.active_users())
        if not active:
            break
        data = [d for d in train if d[0] in active]
        order = random.sample(range(len(data)), len(data))
        bar = tqdm(range(0, len(order), bs), desc=f"{desc} (epoch {epoch}, {len(active)} users)", leave=False)
        for i in bar:
            idx = order[i:i + bs]
            ids = torch.stack([data[j][1] for j in idx])
            users = torch.tensor([data[j][0] for j in idx])
            out = pm(input_ids=ids, labels=ids, user_ids=users)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            pm.restore_frozen_users()
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
        es.update(epoch, per_user_loss(pm, [d for d in val if d[0] in active]))
    summary = es.finish()                                  # every user at its best epoch
    pm.eval()
    final = per_user_loss(pm, val)                         # check: nobody above its starting loss
    worse = sum(final[u] > es.start_loss[u] + 1e-5 for u in val_users)
    hist = summary["users_by_best_epoch"] + [0] * (max_epochs - summary["epochs_run"])
    mean = lambda d: sum(d.values()) / max(1, len(d))  # noqa: E731
    return {"epochs_run": summary["epochs_run"], "best_epoch_hist": hist, "no_val": es.no_val,
            "val_start": mean(es.start_loss), "val_best": mean(final), "worse": worse}


def summarize(per_user: Dict[int, float], corpus: Corpus) -> Dict[str, float]:
    """Macro averages over users: overall and per history bucket."""
    out = {"all": sum(per_user.values()) / len(per_user)}
    for b in ("sparse", "medium", "rich"):
        vals = [v for u, v in per_user.items() if bucket_of(corpus.history[u]) == b]
        out[b] = sum(vals) / len(vals) if vals else float("nan")
    return out


def build_corpus(args):
    """(corpus, schedule of the stages) of ``--quick`` or the full run."""
    if args.quick:
        corpus = make_corpus(num_users=32, generic_seqs=1500, seed=args.seed)
        sched = dict(pretrain=300, pop=5, group=5, user=6)
    else:
        corpus = make_corpus(num_users=192, generic_seqs=6000, seed=args.seed)
        sched = dict(pretrain=1500, pop=6, group=6, user=6)
    if args.user_epochs is not None:
        sched["user"] = args.user_epochs
    return corpus, sched


def proper_config(num_users: int, backend: str = "reference") -> ProperConfig:
    return ProperConfig(num_experts=4, expert_rank=4, expert_alpha=8.0, num_users=num_users, user_rank=4,
                        user_alpha=8.0, user_embed_dim=8, population_rank=8, population_alpha=16.0,
                        balance_weight=0.01, diversity_weight=0.01, backend=backend)


def print_table(rows, buckets, seconds: float) -> None:
    print()
    print(f"held-out next-token loss (nats, macro-average over users; lower is better); {seconds:.0f} s")
    print()
    print(f"| stage | all | sparse ({buckets['sparse']}) | medium ({buckets['medium']}) | rich ({buckets['rich']}) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['all']:.3f} | {r['sparse']:.3f} | {r['medium']:.3f} | {r['rich']:.3f} |")
    print()
    print("gain of each stage over the previous one (positive = lower loss):")
    prev = rows[0][1]
    for name, r in rows[1:4]:
        print(f"  {name:18s} " + "  ".join(f"{b} {prev[b] - r[b]:+.3f}" for b in ("all", "sparse", "medium", "rich")))
        prev = r


# ---------------------------------------------------------------------- --distributed
def train_sharded(pm, data, epochs: float, lr: float, bs: int, desc: str, with_users: bool = True, seed: int = 0):
    """One stage on every rank: each rank ``bs / world_size`` sequences a step, of the
    users it owns (UserShardSampler); DDP over the shared parameters that train; the
    lazy per-user AdamW of ``pm.make_optimizer`` on the user rows."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from proper_kernels.integrations.distributed import UserShardSampler

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = next(pm.parameters()).device
    sampler = UserShardSampler([u for u, _ in data], max(1, bs // world), rank=rank, world_size=world, seed=seed)
    banked = {id(p) for _, p in pm.user_bank.tensors()}
    shared = any(p.requires_grad and id(p) not in banked for p in pm.parameters())
    model = DDP(pm, device_ids=[dev.index] if dev.type == "cuda" else None) if shared else pm
    opt = pm.make_optimizer(lr=lr, weight_decay=0.0)
    steps = max(1, round(epochs * len(data) / bs))
    pm.train()
    batches, epoch = iter(()), 0
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=rank != 0):
        idx = next(batches, None)
        if idx is None:
            sampler.set_epoch(epoch)
            epoch += 1
            batches = iter(sampler)
            idx = next(batches)
        ids = torch.stack([data[i][1] for i in idx]).to(dev)
        users = torch.tensor([data[i][0] for i in idx], device=dev) if with_users else None
        out = model(input_ids=ids, labels=ids, user_ids=users)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    pm.eval()


def sharded_heldout(pm, corpus: Corpus, with_users: bool = True) -> Dict[str, float]:
    """:func:`summarize` of every user's held-out loss, each rank measuring its own users."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = per_user_loss(pm, [d for d in corpus.heldout if d[0] % world == rank], with_users)
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return summarize({u: v for part in parts for u, v in part.items()}, corpus)


def run_distributed(args, t0: float) -> None:
    """The three stages under torchrun, users sharded by rank (see the module docstring)."""
    import datetime
    import os

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        corpus, sched = build_corpus(args)
        buckets = {b: sum(bucket_of(h) == b for h in corpus.history) for b in ("sparse", "medium", "rich")}
        log(f"{world} ranks ({'nccl' if cuda else 'gloo'}), users sharded by rank; corpus: "
            f"{len(corpus.history)} users, {len(corpus.train)} training sequences")
        # the same base on every rank (seeded); DDP would broadcast rank 0's anyway
        base = pretrain(tiny_llama(corpus.vocab, args.seed), corpus.generic, sched["pretrain"], progress=rank == 0)
        pm = get_proper_model(base, proper_config(len(corpus.history), "auto" if cuda else "reference")).to(dev)
        pm.shard_users(rank=rank, world_size=world)
        rows = [("base", sharded_heldout(pm, corpus, with_users=False))]
        pm.set_stage("population")
        train_sharded(pm, corpus.train, sched["pop"], args.lr, 32, "stage 1: population", with_users=False,
                      seed=args.seed)
        pm.merge_population()
        rows.append(("+ population", sharded_heldout(pm, corpus, with_users=False)))
        pm.set_stage("group")
        train_sharded(pm, corpus.train, sched["group"], args.lr, 32, "stage 2: group", seed=args.seed)
        rows.append(("+ group", sharded_heldout(pm, corpus)))
        pm.set_stage("user")
        train_sharded(pm, corpus.train, sched["user"], args.user_lr, 32, "stage 3: user", seed=args.seed)
        rows.append(("+ user (PROPER)", sharded_heldout(pm, corpus)))
        if args.save:
            pm.save_pretrained(args.save)  # every rank: its users' rows; rank 0 the config and shared tensors
            log(f"saved to {args.save} ({world} user shards)")
        if rank == 0:
            print_table(rows, buckets, time.time() - t0)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpus and short training (< 1 minute)")
    ap.add_argument("--oppu", action="store_true", help="also run population -> user without the group stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate of the three stages")
    ap.add_argument("--user-lr", type=float, default=1e-3, help="learning rate of the user stage (per-user data is tiny)")
    ap.add_argument("--user-epochs", type=int, default=None,
                    help="most epochs of the user stage (default 6; per-user early stopping picks each user's best)")
    ap.add_argument("--patience", type=int, default=2,
                    help="user stage: epochs without validation improvement before a user is frozen at its best")
    ap.add_argument("--val-frac", type=float, default=0.2,
                    help="user stage: share of each user's training history held out for validation "
                         "(at least 1 sequence when the user has >= 2, at most 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    ap.add_argument("--distributed", action="store_true",
                    help="under torchrun: users sharded by rank, DDP over the shared parameters (gloo on CPU, nccl "
                         "on GPUs)")
    ap.add_argument("--save", default=None, help="--distributed: save the trained model here (each rank its users)")
    args = ap.parse_args()
    if args.distributed and args.oppu:
        ap.error("--oppu runs in one process: drop it with --distributed")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.distributed:
        return run_distributed(args, t0)

    corpus, sched = build_corpus(args)
    buckets = {b: sum(bucket_of(h) == b for h in corpus.history) for b in ("sparse", "medium", "rich")}
    print(f"corpus: {len(corpus.history)} users in {max(corpus.user_group) + 1} groups, "
          f"{len(corpus.train)} training / {len(corpus.heldout)} held-out sequences of {corpus.seq_len} tokens; "
          f"history sizes (Pareto) min {min(corpus.history)} max {max(corpus.history)}; users per bucket "
          f"(sparse <= 6 < medium <= 24 < rich) {buckets}")

    base = pretrain(tiny_llama(corpus.vocab, args.seed), corpus.generic, sched["pretrain"])
    cfg = proper_config(len(corpus.history))
    base_copy = copy.deepcopy(base) if args.oppu else None
    pm = get_proper_model(base, cfg)
    rows = [("base", summarize(heldout_loss(pm, corpus, with_users=False), corpus))]

    pm.set_stage("population")
    train_stage(pm, corpus.train, sched["pop"], args.lr, 32, "stage 1: population", with_users=False)
    pm.merge_population()
    rows.append(("+ population", summarize(heldout_loss(pm, corpus, with_users=False), corpus)))
    pop_state = pm.adapter_state_dict() if args.oppu else None

    pm.set_stage("group")
    train_stage(pm, corpus.train, sched["group"], args.lr, 32, "stage 2: group")
    rows.append(("+ group", summarize(heldout_loss(pm, corpus), corpus)))

    # User stage: per-user early stopping on a validation split of each user's training
    # history (the population and group stages, whose schedules are fixed, train on the
    # whole history; the user stage trains on what the split leaves).
    user_train, user_val = split_validation(corpus.train, args.val_frac, seed=args.seed)
    print(f"user stage: {len(user_train)} training / {len(user_val)} validation sequences, "
          f"at most {sched['user']} epochs, patience {args.patience}")
    pm.set_stage("user")
    info = train_users_early_stopping(pm, user_train, user_val, sched["user"], args.user_lr, 32, "stage 3: user",
                                      patience=args.patience)
    print(f"  PROPER user stage: {info['epochs_run']} epochs run; users by best epoch (0 = group stage kept) "
          f"{info['best_epoch_hist']}; validation loss {info['val_start']:.3f} -> {info['val_best']:.3f}, "
          f"{info['worse']} users above their group-stage validation loss")
    rows.append(("+ user (PROPER)", summarize(heldout_loss(pm, corpus), corpus)))

    if args.oppu:  # population -> user directly (no experts): OPPU-style
        ocfg = copy.deepcopy(cfg)
        ocfg.num_experts = 0
        opm = get_proper_model(base_copy, ocfg)
        with torch.no_grad():
            for name, layer in opm.adapted_layers():
                layer.population_A.copy_(pop_state[f"{name}.merged_population_A"])
                layer.population_B.copy_(pop_state[f"{name}.merged_population_B"])
        opm.merge_population()
        opm.set_stage("user")
        info = train_users_early_stopping(opm, user_train, user_val, sched["user"], args.user_lr, 32,
                                          "OPPU: user only", patience=args.patience)
        print(f"  OPPU user stage: {info['epochs_run']} epochs run; users by best epoch (0 = population kept) "
              f"{info['best_epoch_hist']}; validation loss {info['val_start']:.3f} -> {info['val_best']:.3f}, "
              f"{info['worse']} users above their population-stage validation loss")
        rows.append(("pop + user (no group)", summarize(heldout_loss(opm, corpus), corpus)))

    print_table(rows, buckets, time.time() - t0)


if __name__ == "__main__":
    main()
