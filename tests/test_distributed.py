"""A ProperModel on two processes (torch.distributed, gloo, CPU): DDP and FSDP2 in every
stage with the auxiliary losses on, users sharded by rank (DDP, FSDP2, the lazy
per-user optimiser), a sharded checkpoint read back at 1 and 3 ranks. Every run is
compared with one process on the ranks' batches concatenated.

The two ranks are this file run as a script (``python test_distributed.py --rank r
...``), once for every scenario (importing torch and transformers dominates); the
parent computes the one-process references meanwhile. Every collective has a timeout
(``init_process_group(timeout=...)``) and so has the wait for the ranks.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time
import traceback

import torch

WORLD = 2
NUM_USERS = 6
ROWS, LENGTH, STEPS = 4, 8, 2  # rows per rank and step, tokens per row, optimiser steps
LR, EPS = 1e-2, 1e-6  # AdamW; eps 1e-6: a gradient at rounding level (1e-9) is not a step of LR
ATOL = 1e-5  # two fp32 computations of one step with different reduction orders
COLLECTIVE_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 150


# ---------------------------------------------------------------------- scenarios (ranks and parent)
def _setup(stage: str, **overrides):
    """A ProperModel of the tiny Llama in ``stage``, every earlier stage's adapters random
    (the same on every process), in training mode."""
    from proper_kernels.integrations import get_proper_model
    from proper_kernels.integrations.stages import STAGES
    from proper_kernels.testing import randomize_adapters, tiny_causal_lm, tiny_proper_config

    cfg = dict(num_users=NUM_USERS, balance_weight=0.5, diversity_weight=0.5)
    cfg.update(overrides)
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config(**cfg))
    for seed, st in enumerate(STAGES[:STAGES.index(stage) + 1], start=1):
        pm.set_stage(st)
        randomize_adapters(pm, seed=seed)
    return pm.train()


def _mixed_batches(seed: int = 0):
    """STEPS global batches (input ids [WORLD * ROWS, LENGTH], users [WORLD * ROWS], -1 included)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 97, (WORLD * ROWS, LENGTH), generator=g),
             torch.randint(-1, NUM_USERS, (WORLD * ROWS,), generator=g)) for _ in range(STEPS)]


def _sharded_batches(rank: int, world: int):
    """STEPS batches of UserShardSampler: rank ``rank``'s, or (world 1) the union of the
    WORLD ranks' batches, rank 0's rows first."""
    from proper_kernels.integrations.distributed import UserShardSampler

    g = torch.Generator().manual_seed(1)
    n = 3 * WORLD * ROWS
    ids = torch.randint(3, 97, (n, LENGTH), generator=g)
    users = torch.cat([torch.arange(NUM_USERS).repeat(n // NUM_USERS), -torch.ones(n % NUM_USERS, dtype=torch.long)])
    users[::5] = -1  # rows without a user go to the emptier ranks
    samplers = [UserShardSampler(users, ROWS, rank=r, world_size=WORLD, seed=3) for r in range(WORLD)]
    per_rank = [s.rank_batches(r) for r, s in enumerate(samplers)]
    out = []
    for step in range(STEPS):
        rows = per_rank[rank][step] if world > 1 else sum((b[step] for b in per_rank), [])
        out.append((ids[rows], users[rows]))
    return out


def _full(t):
    from proper_kernels.integrations.distributed import _is_dtensor

    return (t.full_tensor() if _is_dtensor(t) else t).detach().clone()


def _train(model, pm, batches, opt=None):
    """STEPS optimiser steps; the gradients of step 1 and the trainable parameters after."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
    grads, losses = {}, []
    for step, (ids, users) in enumerate(batches):
        out = model(input_ids=ids, labels=ids, user_ids=users)
        opt.zero_grad()
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        if step == 0:
            grads = {n: _full(p.grad) for n, p in pm.named_parameters() if p.grad is not None}
        opt.step()
    params = {n: _full(p) for n, p in pm.named_parameters() if p.requires_grad}
    return {"grads": grads, "params": params, "losses": losses}


def _is_user_row(name: str) -> bool:
    from proper_kernels.integrations.user_bank import USER_PARAMS

    return name.rsplit(".", 1)[-1] in USER_PARAMS


def _rows_of(rank: int, world: int, batches):
    if world == 1:
        return batches
    sl = slice(rank * ROWS, (rank + 1) * ROWS)
    return [(ids[sl], users[sl]) for ids, users in batches]


def scenario(name: str, rank: int, world: int, out_dir: str):
    """Run scenario ``name`` as rank ``rank`` of ``world`` (world 1: the one-process
    reference on the concatenated batches); returns its results."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from proper_kernels.integrations.distributed import fully_shard_model

    from proper_kernels.integrations.distributed import set_balance_group

    kind, stage = name.split(":")[:2]
    if kind in ("ddp", "ddp-lazy", "ddp-local-balance", "fsdp2", "fsdp2-triton"):  # the whole bank on every rank
        over = dict(target_modules=("down_proj",), backend="triton") if kind == "fsdp2-triton" else {}
        pm = _setup(stage, **over)
        if kind == "ddp-local-balance":  # each rank's balance loss over its own rows
            set_balance_group(pm, None)
        batches = _rows_of(rank, world, _mixed_batches())[:1 if kind == "fsdp2-triton" else STEPS]
        if world > 1:
            model = DDP(pm) if kind.startswith("ddp") else fully_shard_model(pm)
        else:
            model = pm
        # ddp-lazy: the lazy per-user optimiser steps the users of every rank's batch
        opt = pm.make_optimizer(lr=LR, eps=EPS) if kind == "ddp-lazy" else None
        res = _train(model, pm, batches, opt)
        if name == "fsdp2:group" and world > 1:  # a collective: the shared tensors are gathered
            pm.save_pretrained(os.path.join(out_dir, "ckpt-fsdp2"))
        return res
    # users sharded by rank
    pm = _setup(stage, aux_in_user_stage=True)
    if world > 1:
        pm.shard_users(rank=rank, world_size=world)
    batches = _sharded_batches(rank, world)
    shared_trains = any(p.requires_grad for n, p in pm.named_parameters() if not _is_user_row(n))
    model = pm
    if world > 1 and shared_trains:
        model = DDP(pm) if kind == "shard-ddp" else fully_shard_model(pm)
    opt = pm.make_optimizer(lr=LR, eps=EPS) if kind == "shard-lazy" else None
    res = _train(model, pm, batches, opt)
    if kind == "shard-ddp" and stage == "group" and out_dir:
        pm.save_pretrained(os.path.join(out_dir, "ckpt") if world > 1 else os.path.join(out_dir, "ckpt-1"))
    return res


SCENARIOS = ["ddp:population", "ddp:group", "ddp:user", "ddp-lazy:group", "fsdp2:population", "fsdp2:group", "fsdp2:user",
             "fsdp2-triton:group", "ddp-local-balance:group", "shard-ddp:group", "shard-ddp:user",
             "shard-fsdp2:group", "shard-lazy:user"]


def _error_checks(rank: int, world: int):
    """Messages of the errors a sharded rank gives: a row of another rank's user, and
    FSDP2 not told to leave the user rows alone."""
    from torch.distributed.fsdp import fully_shard

    from proper_kernels.integrations.distributed import decoder_layers

    out = {}
    pm = _setup("group")
    pm.shard_users(rank=rank, world_size=world)
    other = (rank + 1) % world
    try:
        pm(input_ids=torch.randint(3, 97, (1, LENGTH)), user_ids=[other])
    except ValueError as e:
        out["foreign_user"] = str(e)
    for block in decoder_layers(pm):
        fully_shard(block)
    fully_shard(pm)
    try:
        pm(input_ids=torch.randint(3, 97, (1, LENGTH)), user_ids=[rank])
    except RuntimeError as e:
        out["fsdp2_took_rows"] = str(e)
    return out


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        results = {}
        for name in SCENARIOS:
            torch.manual_seed(1234)  # fresh user rows drawn the same on every process
            results[name] = scenario(name, rank, world, out_dir)
        results["errors"] = _error_checks(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--out")
    a = ap.parse_args()
    try:
        _rank_main(a.rank, a.world, a.port, a.out)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


# ---------------------------------------------------------------------- the tests (parent)
import pytest  # noqa: E402

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(results of rank 0 and 1, the one-process references, the output folder)."""
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"),
               PROPER_KERNELS_BACKEND=os.environ.get("PROPER_KERNELS_BACKEND", "reference"))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank", str(r), "--world", str(WORLD),
                               "--port", str(port), "--out", str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    try:
        refs = {}
        for name in SCENARIOS:
            torch.manual_seed(1234)
            refs[name] = scenario(name, 0, 1, str(out))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log[-4000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, refs, out


def _owned(rank: int, n: int = NUM_USERS):
    return list(range(rank, n, WORLD))


def _assert_matches(name: str, rank_res: dict, ref: dict, rank: int, sharded: bool) -> None:
    for part in ("grads", "params"):
        got, want = rank_res[part], ref[part]
        assert set(got) == set(want), f"{name} {part}: {sorted(set(got) ^ set(want))[:4]}"
        for key, t in got.items():
            w = want[key]
            if sharded and _is_user_row(key):
                w = w[_owned(rank)]  # this rank's rows only
            err = (t.double() - w.double()).abs().max().item()
            assert err <= ATOL, f"{name} rank {rank} {part} {key}: max err {err:.3g} > {ATOL}"


@pytest.mark.parametrize("name", [s for s in SCENARIOS if s.split(":")[0] in ("ddp", "ddp-lazy", "fsdp2", "fsdp2-triton")])
def test_data_parallel_step_equals_one_process(runs, name):
    """DDP and FSDP2 (the whole bank on every rank), auxiliary losses on: gradients and
    updated parameters equal one process on the concatenated batch."""
    ranks, refs, _ = runs
    if name.split(":")[1] == "group":  # the balance loss is part of the loss and moves the router
        assert any("router_weight" in k for k in refs[name]["grads"])
    for r in range(WORLD):
        _assert_matches(name, ranks[r][name], refs[name], r, sharded=False)


@pytest.mark.parametrize("name", [s for s in SCENARIOS if s.startswith("shard")])
def test_sharded_users_follow_the_union_batch(runs, name):
    """Users sharded by rank: every rank holds its users' rows alone, the shared
    parameters are reduced, and the trajectory is one process's on the union batch."""
    ranks, refs, _ = runs
    for r in range(WORLD):
        res = ranks[r][name]
        rows = [t.shape[0] for k, t in res["params"].items() if _is_user_row(k)]
        assert rows and set(rows) == {len(_owned(r))}
        _assert_matches(name, res, refs[name], r, sharded=True)


def test_balance_loss_over_each_rank_alone_differs(runs):
    """The control: with each rank's balance loss over its own rows the router's
    gradient is not the one of the concatenated batch (the test above can fail)."""
    ranks, refs, _ = runs
    got, want = ranks[0]["ddp-local-balance:group"]["grads"], refs["ddp-local-balance:group"]["grads"]
    err = max((got[k] - want[k]).abs().max().item() for k in got if "router_weight" in k)
    assert err > 100 * ATOL


def test_sharded_checkpoint_loads_at_any_world_size(runs):
    """Saved by 2 ranks (each its users, rank 0 the shared tensors), loaded at 1, 2 and
    3 ranks: every row bit-exact."""
    from proper_kernels.integrations import ProperModel
    from proper_kernels.testing import tiny_causal_lm

    ranks, _, out = runs
    trained = [ranks[r]["shard-ddp:group"]["params"] for r in range(WORLD)]
    whole = ProperModel.from_pretrained(tiny_causal_lm(), str(out / "ckpt"))
    assert whole.num_users == NUM_USERS and whole.stage == "group"
    params = dict(whole.named_parameters())
    for key, t in trained[0].items():
        if _is_user_row(key):
            for r in range(WORLD):
                assert torch.equal(params[key][_owned(r)], trained[r][key]), key
        else:
            assert torch.equal(params[key], t), key
    for world in (2, 3):
        for r in range(world):
            part = ProperModel.from_pretrained(tiny_causal_lm(), str(out / "ckpt"), rank=r, world_size=world)
            assert part.num_users == NUM_USERS
            mine = list(range(r, NUM_USERS, world))
            assert torch.equal(torch.stack([torch.cat([v.flatten() for v in part.get_user_state([u]).values()])
                                            for u in mine]),
                               torch.stack([torch.cat([v.flatten() for v in whole.get_user_state([u]).values()])
                                            for u in mine]))
            local = dict(part.named_parameters())
            for key, t in params.items():
                assert torch.equal(local[key], t[mine] if _is_user_row(key) else t), (world, r, key)


def test_fsdp2_checkpoint_is_the_whole_model(runs):
    """save_pretrained under FSDP2 (every rank calls it) writes the one-process format."""
    from proper_kernels.integrations import ProperModel
    from proper_kernels.testing import tiny_causal_lm

    ranks, _, out = runs
    loaded = dict(ProperModel.from_pretrained(tiny_causal_lm(), str(out / "ckpt-fsdp2")).named_parameters())
    for key, t in ranks[0]["fsdp2:group"]["params"].items():
        assert torch.equal(loaded[key], t), key


def test_sharded_errors_name_user_rank_and_owner(runs):
    ranks, _, _ = runs
    for r in range(WORLD):
        msgs = ranks[r]["errors"]
        other = (r + 1) % WORLD
        assert f"user {other} (owner: rank {other})" in msgs["foreign_user"]
        assert f"not on rank {r} of {WORLD}" in msgs["foreign_user"]
        assert "ignored_params" in msgs["fsdp2_took_rows"]
