"""The PROPER pipeline on a dataset: population -> group -> user, with a checkpoint
and a test evaluation after every stage, resumable from the last completed stage.

Layout of the output directory::

    OUT/run.json                 what the run is (data, task, users, model, adapter config)
    OUT/base.json                the base model's test metrics (before any stage)
    OUT/base_predictions.jsonl   its test predictions
    OUT/<stage>/                 ProperModel.save_pretrained of the stage (from_pretrained loads it)
    OUT/<stage>/stage.json       its test metrics and training summary; written last, so it
                                 marks the stage complete
    OUT/<stage>/predictions.jsonl  one line per test example: id, user, prediction, gold
                                 (LaMP: also lamp_predictions.json, the LaMP evaluation's format)
    OUT/results.json, results.md the table: each stage's metrics, overall and by user bucket

Every stage trains on the training split less the per-user validation split; the
user stage trains all users together (mixed batches) with per-user early stopping on
that validation split (:mod:`proper_kernels.train.early_stopping`). Each stage seeds
its own random streams, so a resumed run trains the later stages as an uninterrupted
run would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .data import BUCKETS, Dataset, bucket_edges, bucket_of, load_dataset, split_validation
from .early_stopping import PerUserEarlyStopping
from .engine import Codec, Encoded, example_losses, generate_outputs, train_epoch
from .metrics import METRICS, compute_metrics
from .report import write_report

__all__ = ["TrainConfig", "RunError", "run", "STAGES"]

STAGES = ("population", "group", "user")


class RunError(RuntimeError):
    """The output directory or the arguments do not fit the run asked for."""


@dataclass
class TrainConfig:
    """Everything one run needs (the CLI's flags; see ``python -m proper_kernels.train -h``)."""

    model: str
    data: str
    output: str
    tokenizer: Optional[str] = None
    task: Optional[str] = None
    stages: Tuple[str, ...] = STAGES
    lamp_split: Optional[str] = None
    max_history: Optional[int] = None
    max_users: Optional[int] = None
    retrieve: int = 0
    retrieve_words: int = 50
    epochs: Dict[str, int] = field(default_factory=lambda: {"population": 2, "group": 2, "user": 5})
    lr: Dict[str, float] = field(default_factory=lambda: {"population": 2e-4, "group": 2e-4, "user": 1e-4})
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    population_rank: int = 8
    population_alpha: float = 16.0
    num_experts: int = 4
    expert_rank: int = 4
    expert_alpha: float = 8.0
    top_k: Optional[int] = None
    user_rank: int = 4
    user_alpha: float = 8.0
    user_embed_dim: int = 8
    balance_weight: float = 0.01
    diversity_weight: float = 0.01
    target_modules: Tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    backend: str = "auto"
    batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 512
    max_new_tokens: int = 64
    prompt_format: str = "{input}\nAnswer:"
    chat_template: bool = False
    val_frac: float = 0.2
    max_val: int = 10
    patience: int = 2
    min_delta: float = 0.0
    buckets: Optional[Tuple[float, float]] = None
    eval_base: bool = True
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    threads: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    stop_after: Optional[str] = None
    progress: bool = False

    def check(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise RunError(f"stages must be a non-empty subset of {STAGES}, got {list(self.stages)}")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise RunError(f"stages run in the order {STAGES}, got {list(self.stages)}")
        if self.stop_after is not None and self.stop_after not in self.stages:
            raise RunError(f"stop_after must be one of the stages run {list(self.stages)}, got {self.stop_after!r}")
        if self.resume and self.overwrite:
            raise RunError("resume and overwrite exclude each other")
        for k in ("batch_size", "eval_batch_size", "max_new_tokens"):
            if getattr(self, k) < 1:
                raise RunError(f"{k} must be >= 1, got {getattr(self, k)}")
        for s in self.stages:
            if self.epochs.get(s, 0) < (1 if s != "user" else 0) or self.lr.get(s, 0) <= 0:
                raise RunError(f"stage {s!r} needs epochs >= 1 and lr > 0, got epochs={self.epochs.get(s)} "
                               f"lr={self.lr.get(s)}")
        if "group" in self.stages and self.num_experts < 1:
            raise RunError("the group stage needs num_experts >= 1 (or leave 'group' out of the stages)")
        for what, path in (("model", self.model), ("tokenizer", self.tokenizer or self.model)):
            if not os.path.isdir(path):
                raise RunError(f"--{what} {path}: no such directory (a local Hugging Face {what} directory)")


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- model
def _torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise RunError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(cfg: TrainConfig):
    """(tokenizer, causal LM) from the local directories (no hub access)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, local_files_only=True)
    dtype = _torch_dtype(cfg.dtype)
    kw = {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, **kw)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(_device(cfg.device))
    model.eval()
    return tok, model


def proper_config(cfg: TrainConfig, num_users: int):
    from proper_kernels.integrations import ProperConfig

    use_group = "group" in cfg.stages
    return ProperConfig(
        target_modules=tuple(cfg.target_modules), num_experts=cfg.num_experts if use_group else 0,
        expert_rank=cfg.expert_rank, expert_alpha=cfg.expert_alpha, router=True, num_users=num_users,
        user_rank=cfg.user_rank if "user" in cfg.stages else 0, user_alpha=cfg.user_alpha,
        user_embed_dim=cfg.user_embed_dim, user_router=True, top_k=cfg.top_k if use_group else None,
        population_rank=cfg.population_rank if "population" in cfg.stages else 0,
        population_alpha=cfg.population_alpha, balance_weight=cfg.balance_weight,
        diversity_weight=cfg.diversity_weight, backend=cfg.backend)


# ----------------------------------------------------------------------------- output directory
def _stage_done(out: str, stage: str) -> bool:
    return os.path.isfile(os.path.join(out, stage, "stage.json"))


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _prepare_output(cfg: TrainConfig, manifest: dict) -> List[str]:
    """Check the output directory against the run; returns the stages completed there
    (kept only with ``resume``)."""
    out = cfg.output
    os.makedirs(out, exist_ok=True)
    done = [s for s in STAGES if _stage_done(out, s)]
    held = done or os.path.isfile(os.path.join(out, "base.json"))
    run_path = os.path.join(out, "run.json")
    if held and not (cfg.resume or cfg.overwrite):
        raise RunError(f"{out} already holds a run (stages done: {done or 'none'}): pass --resume to continue it, "
                       f"--overwrite to start over, or choose another --output")
    if cfg.overwrite:
        for s in STAGES:
            if os.path.isdir(os.path.join(out, s)):
                shutil.rmtree(os.path.join(out, s))
        for f in ("base.json", "base_predictions.jsonl", "base_lamp_predictions.json", "run.json", "results.json",
                  "results.md"):
            if os.path.isfile(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        done = []
    if cfg.resume and os.path.isfile(run_path):
        old = _read_json(run_path)
        for k in ("data", "task", "users", "model", "adapter_config", "seed", "validation"):
            if old.get(k) != manifest.get(k):
                raise RunError(f"--resume: {out}/run.json has a different {k!r} than this run "
                               f"({_short(old.get(k))} vs {_short(manifest.get(k))}); start a new --output")
    stray = [s for s in done if s not in cfg.stages]
    if stray:
        raise RunError(f"{out} holds completed stages {stray} that this run does not have ({list(cfg.stages)})")
    _write_json(run_path, manifest)
    return [s for s in cfg.stages if s in done]


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Test metrics of a model state: teacher-forced loss and the task's metrics of
    greedy generations, overall and by user bucket."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, codec: Codec, tokenizer, test: List, enc_test: List[Encoded],
                 prompts: List[Encoded], max_new: int, buckets_of_user: Dict[str, str]):
        self.cfg, self.ds, self.codec, self.tok = cfg, ds, codec, tokenizer
        self.test, self.enc_test, self.prompts, self.max_new = test, enc_test, prompts, max_new
        self.bucket = buckets_of_user

    def __call__(self, pm, name: str, with_users: bool) -> Tuple[dict, List[dict]]:
        cfg = self.cfg
        losses = example_losses(pm, self.enc_test, cfg.eval_batch_size, self.codec.pad_id, progress=cfg.progress,
                                desc=f"{name}: test loss", with_users=with_users)
        preds = generate_outputs(pm, self.tok, self.prompts, cfg.eval_batch_size, self.codec.pad_id, self.max_new,
                                 first_line=self.ds.kind != "generation", progress=cfg.progress,
                                 desc=f"{name}: generate", with_users=with_users)
        groups = {"all": list(range(len(self.test)))}
        for b in BUCKETS:
            groups[b] = [i for i, ex in enumerate(self.test) if self.bucket[ex.user] == b]
        metrics = {}
        for g, idx in groups.items():
            m = compute_metrics(self.ds.kind, [preds[i] for i in idx], [self.test[i].output for i in idx],
                                self.ds.labels)
            m["loss"] = (sum(losses[i] for i in idx) / len(idx)) if idx else None
            m["n"] = len(idx)
            metrics[g] = m
        rows = [{"id": ex.id, "user": ex.user, "prediction": p, "gold": ex.output}
                for ex, p in zip(self.test, preds)]
        return metrics, rows


def _write_predictions(directory: str, rows: List[dict], ds: Dataset, prefix: str = "") -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, prefix + "predictions.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if ds.task.startswith("LaMP"):  # the LaMP evaluation script's input format
        name = ds.task.replace("-", "_").rstrip("N")
        _write_json(os.path.join(directory, prefix + "lamp_predictions.json"),
                    {"task": name, "golds": [{"id": r["id"], "output": r["prediction"]} for r in rows]})


def _per_user_mean(items: Sequence[Encoded], losses: Sequence[float]) -> Dict[int, float]:
    acc: Dict[int, List[float]] = {}
    for it, v in zip(items, losses):
        acc.setdefault(it.user, []).append(v)
    return {u: sum(v) / len(v) for u, v in acc.items()}


# ----------------------------------------------------------------------------- stages
def _train_shared(pm, stage: str, cfg: TrainConfig, enc_train, enc_val, pad_id: int, rng: random.Random) -> dict:
    with_users = stage != "population"
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=cfg.lr[stage], weight_decay=cfg.weight_decay)
    train_loss, val_loss = [], []
    for epoch in range(1, cfg.epochs[stage] + 1):
        train_loss.append(train_epoch(pm, enc_train, opt, cfg.batch_size, rng, pad_id, progress=cfg.progress,
                                      desc=f"{stage} (epoch {epoch}/{cfg.epochs[stage]})", with_users=with_users,
                                      grad_clip=cfg.grad_clip))
        if enc_val:
            vl = example_losses(pm, enc_val, cfg.eval_batch_size, pad_id, with_users=with_users)
            val_loss.append(sum(vl) / len(vl))
    return {"epochs": cfg.epochs[stage], "lr": cfg.lr[stage], "train_loss": train_loss, "val_loss": val_loss}


def _train_users(pm, cfg: TrainConfig, enc_train, enc_val, pad_id: int, rng: random.Random) -> dict:
    def val_loss(users) -> Dict[int, float]:
        items = [it for it in enc_val if it.user in users]
        return _per_user_mean(items, example_losses(pm, items, cfg.eval_batch_size, pad_id))

    val_users = sorted({it.user for it in enc_val})
    es = PerUserEarlyStopping(pm, val_users, patience=cfg.patience, min_delta=cfg.min_delta)
    es.start(val_loss(set(val_users)))
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=cfg.lr["user"], weight_decay=cfg.weight_decay)
    train_loss = []
    for epoch in range(1, cfg.epochs["user"] + 1):
        active = set(es.active_users())
        if not active:
            break
        data = [it for it in enc_train if it.user in active]
        train_loss.append(train_epoch(pm, data, opt, cfg.batch_size, rng, pad_id, progress=cfg.progress,
                                      desc=f"user (epoch {epoch}/{cfg.epochs['user']}, {len(active)} users)",
                                      after_step=pm.restore_frozen_users, grad_clip=cfg.grad_clip))
        es.update(epoch, val_loss(active))
    summary = es.finish()
    final = val_loss(set(val_users))
    summary["users_above_start"] = sum(final[u] > es.start_loss[u] + 1e-5 for u in val_users)
    summary.update({"max_epochs": cfg.epochs["user"], "lr": cfg.lr["user"], "train_loss": train_loss,
                    "val_loss": [sum(final.values()) / len(final)] if final else []})
    return summary


# ----------------------------------------------------------------------------- run
def run(cfg: TrainConfig, log: Callable[[str], None] = _log) -> dict:
    """Run (or resume) the pipeline; returns the results written to OUT/results.json."""
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    from proper_kernels.integrations import ProperModel, get_proper_model

    t_start = time.time()
    ds = load_dataset(cfg.data, cfg.task, split=cfg.lamp_split, max_history=cfg.max_history, retrieve=cfg.retrieve,
                      retrieve_words=cfg.retrieve_words, seed=cfg.seed)
    if cfg.max_users is not None and cfg.max_users < len(ds.users):
        keep = set(ds.users[:cfg.max_users])
        ds.users = ds.users[:cfg.max_users]
        ds.train = [e for e in ds.train if e.user in keep]
        ds.test = [e for e in ds.test if e.user in keep]
    train, val = split_validation(ds.train, lambda e: e.user, cfg.val_frac, cfg.max_val, cfg.seed)
    pcfg = proper_config(cfg, len(ds.users))
    manifest = {"data": os.path.abspath(cfg.data), "task": ds.task, "kind": ds.kind, "users": ds.users,
                "model": os.path.abspath(cfg.model), "adapter_config": pcfg.to_dict(), "seed": cfg.seed,
                "validation": [cfg.val_frac, cfg.max_val], "config": _jsonable(dataclasses.asdict(cfg))}
    done = _prepare_output(cfg, manifest)
    sizes = ds.history_sizes()
    edges = bucket_edges([sizes[u] for u in sorted({e.user for e in ds.test})], cfg.buckets)
    bucket = {u: bucket_of(n, edges) for u, n in sizes.items()}
    log(f"data: {ds.source} ({ds.task}, {ds.kind}): {len(ds.users)} users, {len(train)} training / {len(val)} "
        f"validation / {len(ds.test)} test examples; buckets by history size: sparse <= {edges[0]:g} < medium "
        f"<= {edges[1]:g} < rich")
    for note in ds.notes:
        log(f"  note: {note}")

    tok, base = load_base(cfg)
    codec = Codec(tok, cfg.max_length, cfg.prompt_format, cfg.chat_template)
    uidx = ds.user_index()
    enc_train, enc_val, enc_test = (codec.encode(x, uidx) for x in (train, val, ds.test))
    if ds.kind == "generation":
        max_new = cfg.max_new_tokens
    else:  # the longest label / training output, EOS included, and a little room
        outs = set(ds.labels) | {e.output for e in ds.train}
        max_new = min(cfg.max_new_tokens, max(len(codec.target_ids(o)) for o in outs) + 2)
    prompts = codec.encode_prompts(ds.test, uidx, max_new)
    evaluator = Evaluator(cfg, ds, codec, tok, ds.test, enc_test, prompts, max_new, bucket)

    last = done[-1] if done else None
    if last is not None:
        pm = ProperModel.from_pretrained(base, os.path.join(cfg.output, last))
        log(f"resume: stages {done} are complete in {cfg.output}; continuing from {cfg.output}/{last}")
    else:
        torch.manual_seed(cfg.seed)
        pm = get_proper_model(base, pcfg)
    pm.to(_device(cfg.device))
    if cfg.gradient_checkpointing:
        pm.gradient_checkpointing_enable()

    info = {"source": ds.source, "task": ds.task, "kind": ds.kind, "model": cfg.model, "users": len(ds.users),
            "train_examples": len(train), "val_examples": len(val), "test_examples": len(ds.test),
            "bucket_edges": list(edges), "notes": ds.notes, "adapter_config": pcfg.to_dict(),
            "bucket_users": {b: sum(1 for u in {e.user for e in ds.test} if bucket[u] == b) for b in BUCKETS}}
    base_path = os.path.join(cfg.output, "base.json")
    if cfg.eval_base and not os.path.isfile(base_path):
        t0 = time.time()
        metrics, rows = evaluator(pm, "base", with_users=False)
        _write_predictions(cfg.output, rows, ds, prefix="base_")
        _write_json(base_path, {"stage": "base", "metrics": metrics, "seconds_eval": time.time() - t0})
        log(_line("base", ds.kind, metrics))

    todo = list(cfg.stages[cfg.stages.index(last) + 1:]) if last else list(cfg.stages)
    stopped = None
    for stage in todo:
        t0 = time.time()
        si = STAGES.index(stage)
        torch.manual_seed(cfg.seed * 1000 + si + 1)
        rng = random.Random(cfg.seed * 1000 + si + 1)
        pm.set_stage(stage)
        log(f"stage {stage}: {pm.num_trainable_parameters():,} trainable parameters")
        if stage == "user":
            tinfo = _train_users(pm, cfg, enc_train, enc_val, codec.pad_id, rng)
        else:
            tinfo = _train_shared(pm, stage, cfg, enc_train, enc_val, codec.pad_id, rng)
        tinfo["seconds"] = time.time() - t0
        t1 = time.time()
        metrics, rows = evaluator(pm, stage, with_users=stage != "population")
        sdir = os.path.join(cfg.output, stage)
        if os.path.isdir(sdir):
            shutil.rmtree(sdir)
        pm.save_pretrained(sdir)
        _write_predictions(sdir, rows, ds)
        _write_json(os.path.join(sdir, "stage.json"),
                    {"stage": stage, "metrics": metrics, "train": tinfo, "seconds_eval": time.time() - t1})
        log(_line(stage, ds.kind, metrics) + f"  [{tinfo['seconds']:.0f} s training]")
        if stage == "user":
            log(f"  user stage: {tinfo['epochs_run']} epochs run; users by best epoch (0 = starting rows kept) "
                f"{tinfo['users_by_best_epoch']}; validation loss {tinfo['val_loss_start']:.3f} -> "
                f"{tinfo['val_loss_best']:.3f}")
        if cfg.stop_after == stage:
            stopped = stage
            break
    results = _collect(cfg, info, stopped, time.time() - t_start)
    write_report(cfg.output, results)
    log(f"results: {os.path.join(cfg.output, 'results.md')}")
    return results


def _collect(cfg: TrainConfig, info: dict, stopped: Optional[str], seconds: float) -> dict:
    stages = {}
    base_path = os.path.join(cfg.output, "base.json")
    if os.path.isfile(base_path):
        stages["base"] = _read_json(base_path)
    for s in cfg.stages:
        if _stage_done(cfg.output, s):
            stages[s] = _read_json(os.path.join(cfg.output, s, "stage.json"))
    pending = [s for s in cfg.stages if s not in stages]
    return dict(info, metrics=list(METRICS[info["kind"]]) + ["loss"], stages=stages, pending=pending,
                stopped_after=stopped, seconds_this_run=seconds, config=_jsonable(dataclasses.asdict(cfg)))


def _line(stage: str, kind: str, metrics: dict) -> str:
    parts = []
    for m in METRICS[kind] + ("loss",):
        v = metrics["all"].get(m)
        parts.append(f"{m} {v:.4f}" if v is not None else f"{m} -")
    return f"  {stage:10s} test ({metrics['all']['n']} examples): " + ", ".join(parts)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
