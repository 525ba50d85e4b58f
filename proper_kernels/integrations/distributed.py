"""A :class:`ProperModel` on several processes with torch.distributed: DDP, FSDP2, and
the user bank sharded by rank.

DDP (``DistributedDataParallel(pm)``) and FSDP2 (``fully_shard`` on each decoder
layer, then on the model: :func:`fully_shard_model`) train a ProperModel as any model;
a step equals one process on the ranks' batches concatenated. What is ours:

* The balance loss is the global batch's (global-batch load balancing): the
  per-expert gate masses [K] of every layer are all-reduced (one collective of
  layers x K floats a step, :func:`global_importance`) and the cv^2 is taken of the
  sum. The diversity loss is formed in each layer's forward, where FSDP2 has gathered
  the experts (``ProperLinear.track_diversity``): nothing more is gathered for it.
* Users sharded by rank (``pm.shard_users(rank, world_size)``, :func:`shard_users`):
  rank r holds only the rows (e_u, A_u, B_u, V_u of every layer) of the users u with
  ``u % world_size == r``, user u at local row ``u // world_size``. Shared parameters
  (population LoRA, experts, routers, W_e) stay replicated and reduced; user rows are
  never reduced nor gathered: DDP skips them (``_ddp_params_and_buffers_to_ignore``),
  FSDP2 gets them as ``ignored_params`` (:func:`fully_shard_model`).
  :class:`UserShardSampler` sends each user's rows to its owner, the same number of
  rows to every rank a step.

Gradients: each rank's loss is the mean over its rows and data parallelism averages
the shared gradients over the W ranks, which (equal row counts) is one process on the
union batch. A user row gets gradient from its owner's rows alone, so a hook divides
it by W; the balance loss's gradient on a rank's gates is W times its share (the
average divides by W again). With AdamW, or ``pm.make_optimizer()`` (lazy per-user
AdamW), the trajectory is that of one process on the union batch.

Checkpoints: every rank calls ``pm.save_pretrained(dir)`` (:func:`save_pretrained`);
rank r writes its users' rows to ``proper_users-<r>-of-<W>.safetensors``, rank 0 the
config and the shared tensors (gathered first under FSDP2: a collective).
``ProperModel.from_pretrained(base, dir, rank=r, world_size=W)`` reads a sharded or a
full save at any world size (no rank: every user).

Launch (``torchrun --nproc_per_node N train.py``)::

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pm = get_proper_model(model, cfg).to(device)
    pm.shard_users(rank=rank, world_size=world)      # optional: each rank its users' rows
    pm.set_stage("group")                            # set the stage, then wrap
    ddp = DistributedDataParallel(pm)                # or fully_shard_model(pm)
    sampler = UserShardSampler(row_users, batch_size=8, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
"""
from __future__ import annotations

import copy
import json
import os
import random
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from .bank_io import SafetensorsFile, write_safetensors
from .user_bank import USER_PARAMS, UserBank, data_parallel_world, live_dist

__all__ = ["UserSharding", "shard_users", "user_parameters", "fully_shard_model", "decoder_layers",
           "UserShardSampler", "global_importance", "set_balance_group", "balance_group", "save_pretrained",
           "saves_distributed", "UserRowsSource", "SHARD_FILE"]

SHARD_FILE = "proper_users-{rank:05d}-of-{world:05d}.safetensors"


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return False
    return isinstance(t, DTensor)


# ---------------------------------------------------------------------- which rank holds which user
class UserSharding:
    """Rank ``rank`` of ``world_size`` owns the users u with ``u % world_size == rank``;
    user u is row ``u // world_size`` of the rank's bank tensors.

    It also keeps the bank Parameters it was attached to (a wrapper that replaces them,
    e.g. FSDP2 not told to ignore them, is caught at the next forward) and their
    gradient hooks (each divides the gradient by ``world_size``)."""

    def __init__(self, rank: int, world_size: int):
        for name, v in (("rank", rank), ("world_size", world_size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}: {v!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self._params: Dict[str, nn.Parameter] = {}
        self._hooked: Dict[int, object] = {}  # id(parameter) -> its hook handle

    def owns(self, user: int) -> bool:
        return user % self.world_size == self.rank

    def owned(self, num_users: int) -> List[int]:
        """The global ids this rank holds, ascending (local row i is ``owned[i]``)."""
        return list(range(self.rank, num_users, self.world_size))

    def _not_here(self, users: Tensor):
        us = sorted(set(users.tolist()))
        W = self.world_size
        which = ", ".join(f"user {u} (owner: rank {u % W})" for u in us[:4]) + (", ..." if len(us) > 4 else "")
        raise ValueError(f"{which} not on rank {self.rank} of {W}: this rank holds the users u with u % {W} == "
                         f"{self.rank}. Send each user's rows to the rank that owns it "
                         f"(proper_kernels.integrations.distributed.UserShardSampler does)")

    def rows(self, ids: Tensor) -> Tensor:
        """Local rows of global ids ``ids`` (int64; -1, no user, stays -1); ValueError
        naming a user another rank owns, this rank and the owner."""
        mine = ids >= 0
        other = ids[mine & (ids % self.world_size != self.rank)]
        if other.numel():
            self._not_here(other)
        return torch.where(mine, torch.div(ids, self.world_size, rounding_mode="floor"), ids)

    def attach(self, bank) -> None:
        """Take the bank's current user Parameters as this rank's (after sharding, and
        after the bank replaced them by larger ones)."""
        self._params = dict(bank.tensors())
        self._hooked = {k: h for k, h in self._hooked.items() if any(id(p) == k for p in self._params.values())}

    def check(self, bank) -> None:
        """Before each forward: the bank's user Parameters are still the ones of
        :meth:`attach` (RuntimeError otherwise, e.g. FSDP2 sharded them), and each one
        that trains has its gradient hook (1 / world_size: a row's gradient comes from
        its owner's rows alone, the shared ones are averaged over the ranks)."""
        for key, p in bank.tensors():
            if self._params.get(key) is not p:
                raise RuntimeError(
                    f"the user rows {key} are not the ones shard_users left on this rank (a wrapper replaced them: "
                    f"FSDP2 shards every parameter it is not told to ignore). Wrap with "
                    f"proper_kernels.integrations.distributed.fully_shard_model(pm), or pass "
                    f"ignored_params=set(user_parameters(pm)) to every fully_shard call")
            if p.requires_grad and id(p) not in self._hooked and self.world_size > 1:
                scale = 1.0 / self.world_size
                self._hooked[id(p)] = p.register_hook(lambda g, s=scale: g * s)


class ShardedUserBank:
    """The user bank of one rank of a user-sharded run: global user ids in, the rows of
    ``inner`` out. ``inner`` is a bank of this rank's users alone (a ``UserBank``, or a
    ``PagedUserBank``), whose user i is global user ``owned[i]`` (``i = u //
    world_size``); it keeps the rows, the frozen users' pins and the lazy optimiser
    state in its own (local) ids.

    Methods that take user ids take global ids and raise ValueError, naming the user,
    this rank and the owner, for a user of another rank; the others are the inner
    bank's. ``num_users`` is the global N; ``names`` map names to global ids."""

    def __init__(self, inner, sharding: UserSharding, config, names=None):
        self.inner, self.sharding, self.config = inner, sharding, config
        inner.sharded = True  # its rows are this rank's alone: never reduced across ranks
        self.layers = inner.layers
        self.names: Dict = dict(names or {})
        sharding.attach(inner)

    def __getattr__(self, name: str):
        # the id-free parts of the bank interface (mode, tensors, row_specs, fit_rows,
        # restore_frozen, route's lazy optimiser state: groups, optim_state, begin_step /
        # end_step in local rows, sync, save_entries, device_bytes, ...) are the inner bank's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def num_users(self) -> int:
        return self.config.num_users

    def index(self, users) -> Tensor:
        """Validated global ids (int64 [n]), as ``UserBank.index``."""
        return UserBank.index(self, users)

    def _local(self, users) -> Tensor:
        return self.sharding.rows(self.index(users))

    def get_state(self, users) -> Dict[str, Tensor]:
        return self.inner.get_state(self._local(users))

    def set_state(self, state: Dict[str, Tensor], users, *, partial: bool = False) -> None:
        self.inner.set_state(state, self._local(users), partial=partial)

    def add(self, n: int) -> List[int]:
        """Grow the global bank by ``n`` users; this rank gets rows for the new ids it owns."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        new = list(range(self.num_users, self.num_users + n))
        self.inner.add(sum(map(self.sharding.owns, new)))
        self.config.num_users += n
        self.sharding.attach(self.inner)
        return new

    def set_names(self, names) -> None:
        UserBank.set_names(self, names)

    @property
    def frozen(self) -> List[int]:
        return [self.sharding.rank + self.sharding.world_size * r for r in self.inner.frozen]

    def freeze(self, users, state: Optional[Dict[str, Tensor]] = None) -> None:
        self.inner.freeze(self._local(users), state)

    def unfreeze(self, users=None) -> None:
        """Unpin ``users`` (global ids; those of other ranks are not pinned here)."""
        if users is None:
            return self.inner.unfreeze(None)
        ids = self.index(users)
        mine = ids[ids % self.sharding.world_size == self.sharding.rank]
        self.inner.unfreeze(self.sharding.rows(mine))

    def route(self, ids: Tensor) -> Tuple[Tensor, int]:
        """(rows the kernels index, their count) of a batch's global user ids (-1 kept)."""
        self.sharding.check(self.inner)
        return self.inner.route(self.sharding.rows(ids))


def _local_config(config, n_local: int):
    cfg = copy.deepcopy(config)
    cfg.num_users = n_local
    return cfg


def _adopt(pm, inner, sharding: UserSharding, names=None) -> None:
    """Make ``inner`` (a bank of this rank's users) the model's, behind a
    :class:`ShardedUserBank`, and hide the user rows from DDP."""
    pm.user_bank = ShardedUserBank(inner, sharding, pm.proper_config, names)
    # DistributedDataParallel reads this attribute of the module it wraps (as
    # DistributedDataParallel._set_params_and_buffers_to_ignore_for_model sets it): the
    # rows are neither broadcast at construction nor all-reduced.
    pm._ddp_params_and_buffers_to_ignore = user_parameter_names(pm)


def shard_users(pm, rank: int, world_size: int) -> UserSharding:
    """Keep on this process only the users rank ``rank`` of ``world_size`` owns (u with
    ``u % world_size == rank``): a resident bank's tensors [N, ...] become [N_r, ...]
    (user u at row u // world_size), a paged bank's host rows likewise. Call it on
    every rank, before wrapping the model (DDP, FSDP2) and before building the
    optimizer (a resident bank's Parameters are replaced).

    User ids stay global: ``pm(..., user_ids=...)``, ``get_user_state``,
    ``freeze_users``, ``save_pretrained(users=...)`` take global ids, and a user of
    another rank raises ValueError naming the user, this rank and the owner. Frozen
    users of other ranks are dropped here. ``pm.num_users`` stays N; ``add_users(n)``
    gives this rank rows for the new ids it owns. Returns the :class:`UserSharding`.
    """
    sharding = UserSharding(rank, world_size)
    bank = pm.user_bank
    if isinstance(bank, ShardedUserBank):
        raise RuntimeError(f"the users are already sharded (rank {bank.sharding.rank} of {bank.sharding.world_size}); "
                           f"shard_users runs once, on the whole bank")
    N = bank.num_users
    if N < world_size:
        raise ValueError(f"shard_users needs at least world_size users, one per rank: the bank has {N}, "
                         f"world_size={world_size} (add_users(n) first)")
    for key, p in bank.tensors():
        if _is_dtensor(p):
            raise RuntimeError(f"{key} is a DTensor (FSDP2): call shard_users before fully_shard")
    owned = sharding.owned(N)
    bank.restore_frozen()  # a frozen user's rows are its pinned ones: pinned again below
    frozen = [u for u in bank.frozen if sharding.owns(u)]
    cfg = _local_config(pm.proper_config, len(owned))
    if bank.mode == "resident":  # the owned rows become the layers' Parameters
        rows = bank.get_state(owned)
        for name, layer in bank.layers:
            for pname in USER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    setattr(layer, pname, nn.Parameter(rows[f"{name}.{pname}"], requires_grad=p.requires_grad))
            layer.num_users = len(owned)
        inner = type(bank)(bank.layers, cfg)
    else:  # paged: a bank of the owned users' host rows (the device slots stay)
        inner = type(bank)(bank.layers, cfg)
        inner.set_state(bank.get_state(owned), list(range(len(owned))))
    _adopt(pm, inner, sharding, bank.names)
    if frozen:
        pm.user_bank.freeze(frozen)
    return sharding


def user_parameters(pm) -> List[nn.Parameter]:
    """The bank's user Parameters (e_u, A_u, B_u, V_u of every layer): FSDP2's
    ``ignored_params`` after :func:`shard_users`."""
    return [p for _, p in pm.user_bank.tensors()]


def user_parameter_names(pm) -> List[str]:
    """Names (as ``pm.named_parameters()`` gives them) of :func:`user_parameters`."""
    mine = {id(p) for p in user_parameters(pm)}
    return [n for n, p in pm.named_parameters() if id(p) in mine]


def decoder_layers(pm) -> List[nn.Module]:
    """The blocks of the ``nn.ModuleList`` that holds the adapted layers (a Hugging
    Face causal LM's ``model.layers``)."""
    paths = [name for name, _ in pm.adapted_layers()]
    for name, module in pm.model.named_modules():
        if isinstance(module, nn.ModuleList) and any(p.startswith(f"{name}.") for p in paths):
            return list(module)
    raise ValueError(f"no nn.ModuleList holds the adapted layers {paths[:3]} of {type(pm.model).__name__}: "
                     f"call fully_shard on its blocks yourself")


def fully_shard_model(pm, **fully_shard_kwargs):
    """FSDP2 on a ProperModel: ``fully_shard`` on each decoder layer (:func:`decoder_layers`),
    then on ``pm``; after :func:`shard_users` the user rows are ``ignored_params``
    (neither sharded nor reduced). Set the stage first (a stage change merges or
    drops parameters: reload a checkpoint and wrap again). Returns ``pm``."""
    from torch.distributed.fsdp import fully_shard

    ignored: Set[nn.Parameter] = set(fully_shard_kwargs.pop("ignored_params", None) or ())
    if isinstance(pm.user_bank, ShardedUserBank):
        ignored |= set(user_parameters(pm))
    elif pm.user_bank.mode != "resident":  # each rank's slots hold other users: never one tensor to shard
        raise ValueError("a paged user bank under FSDP2 needs pm.shard_users(rank, world_size) first")
    for block in decoder_layers(pm):
        fully_shard(block, ignored_params=ignored or None, **fully_shard_kwargs)
    fully_shard(pm, ignored_params=ignored or None, **fully_shard_kwargs)
    return pm


# ---------------------------------------------------------------------- global balance loss
def set_balance_group(pm, group="auto") -> None:
    """Over which ranks the balance loss's gate masses are summed: ``"auto"``
    (default: every rank when a process group of more than one rank is up and the
    model trains with grad enabled), a process group, or None (this rank's batch
    alone). Every rank of the group must run the same training forwards."""
    pm._balance_group = group


def balance_group(pm):
    """The process group of :func:`set_balance_group` for this forward, or None."""
    group = pm.__dict__.get("_balance_group", "auto")
    if not isinstance(group, str):
        return group
    dist = live_dist()
    if dist is None or dist.get_world_size() < 2 or not (pm.training and torch.is_grad_enabled()):
        return None
    return dist.group.WORLD


def global_importance(pm, importances: List[Tensor]) -> List[Tensor]:
    """Per-expert gate masses [K] of every layer summed over the ranks of
    :func:`balance_group` (one all_reduce); unchanged without one.

    The result's value is the global mass; its gradient on this rank's masses is W
    (the group's size) times the local one, since data parallelism averages the
    ranks' gradients: the balance loss of the global batch then trains the router as
    one process on the whole batch does."""
    group = balance_group(pm) if importances else None
    if group is None:
        return importances
    import torch.distributed as dist

    local = torch.cat(importances)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    W = dist.get_world_size(group)
    total = total + W * (local - local.detach())
    return list(total.split([t.numel() for t in importances]))


# ---------------------------------------------------------------------- the sampler
class UserShardSampler(torch.utils.data.Sampler):
    """Batches of dataset rows for rank ``rank`` of a user-sharded run: the rows of the
    users it owns (``u % world_size == rank``) and a share of the rows without a user
    (-1), ``batch_size`` rows a step on every rank, the same number of steps on every
    rank. Use it as ``DataLoader(dataset, batch_sampler=sampler)``; call
    :meth:`set_epoch` each epoch.

    Every rank draws the same plan from ``seed + epoch``: rows of a user go to its
    owner, rows without a user to the ranks with fewest rows, each rank's rows are
    shuffled (``shuffle``) and cut into batches. A rank with fewer rows repeats its
    own from the start to fill ``steps`` batches (``drop_last``: ``steps`` is the
    fewest full batches any rank has, and no row repeats). The union of step s's
    batches over the ranks is the global batch of step s.

    Args:
        row_users: int [len(dataset)], the user of each row (-1: none).
        batch_size: rows per rank and step.
        rank, world_size: default: torch.distributed's (0 and 1 without a process group).
    """

    def __init__(self, row_users: Sequence[int], batch_size: int, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        dist = live_dist()
        world_size = world_size if world_size is not None else data_parallel_world()
        rank = rank if rank is not None else (dist.get_rank() if dist else 0)
        self.sharding = UserSharding(rank, world_size)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        users = torch.as_tensor(row_users).reshape(-1).tolist()
        bad = sorted({u for u in users if not isinstance(u, int) or u < -1})
        if bad:
            raise ValueError(f"row_users must be ints >= -1 (-1: no user), got {bad[:4]}")
        self.row_users, self.batch_size = users, batch_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        counts = self._counts()
        if min(counts) == 0:
            empty = [r for r, c in enumerate(counts) if c == 0]
            raise ValueError(f"ranks {empty} of {world_size} get no rows: no user they own has a row and there are "
                             f"too few rows without a user")
        self.steps = (min(counts) // batch_size if drop_last else -(-max(counts) // batch_size))
        if self.steps == 0:
            raise ValueError(f"drop_last: a rank has {min(counts)} rows, fewer than batch_size={batch_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _assign(self, rng: Optional[random.Random]) -> List[List[int]]:
        """Row indices of each rank: the rows of its users, then (in ``rng``'s order) the
        rows without a user, each to a rank with fewest rows."""
        W = self.sharding.world_size
        per_rank: List[List[int]] = [[] for _ in range(W)]
        free = []
        for i, u in enumerate(self.row_users):
            (per_rank[u % W] if u >= 0 else free).append(i)
        if rng is not None:
            rng.shuffle(free)
        for i in free:
            sizes = [len(p) for p in per_rank]
            per_rank[sizes.index(min(sizes))].append(i)
        return per_rank

    def _counts(self) -> List[int]:
        return [len(rows) for rows in self._assign(None)]

    def rank_rows(self, rank: int) -> List[int]:
        """Row indices rank ``rank`` gets this epoch, in order, before cutting and padding."""
        rng = random.Random(self.seed + self.epoch) if self.shuffle else None
        rows = self._assign(rng)[rank]
        if self.shuffle:
            random.Random(self.seed + self.epoch + 7919 * (rank + 1)).shuffle(rows)
        return rows

    def rank_batches(self, rank: int) -> List[List[int]]:
        """The batches of rank ``rank`` this epoch (this sampler yields its own rank's)."""
        rows = self.rank_rows(rank)
        need = self.steps * self.batch_size
        rows = (rows * (-(-need // len(rows))))[:need]
        return [rows[s * self.batch_size:(s + 1) * self.batch_size] for s in range(self.steps)]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.rank_batches(self.sharding.rank))

    def __len__(self) -> int:
        return self.steps


# ---------------------------------------------------------------------- checkpoints
def saves_distributed(pm) -> bool:
    """Whether ``pm.save_pretrained(dir)`` is a collective save (:func:`save_pretrained`):
    the users are sharded, or FSDP2 sharded the adapters (DTensors)."""
    if isinstance(pm.user_bank, ShardedUserBank):
        return True
    return any(_is_dtensor(p) for _, layer in pm.adapted_layers() for p in layer.parameters(recurse=False))


def save_pretrained(pm, directory: str, layout: Tuple[str, str, str]) -> None:
    """The full save of a distributed run; every rank calls it. ``layout``: the
    directory's (config file, weights file, format) names, as ``save_pretrained``'s.

    Shared tensors that FSDP2 shards are gathered (``full_tensor``, a collective).
    Users sharded: rank r writes its rows to :data:`SHARD_FILE` (the rank, world size,
    bank size and its frozen users in the file's metadata), rank 0 the config (listing
    the shard files) and the shared tensors. Users not sharded: rank 0 writes the
    one-process format. Ends with a barrier when a process group is up."""
    config_name, weights_name, fmt = layout
    bank, dist = pm.user_bank, live_dist()
    sharded = isinstance(bank, ShardedUserBank)
    rank = bank.sharding.rank if sharded else (dist.get_rank() if dist else 0)
    full = {} if sharded else dict(bank.tensors())  # not sharded: the whole bank goes with the shared tensors
    entries = []
    for key, t in list(pm._shared_adapter_tensors().items()) + list(full.items()):
        t = t.full_tensor() if _is_dtensor(t) else t
        entries.append((key, t.dtype, tuple(t.shape), [t.detach()]))
    os.makedirs(directory, exist_ok=True)
    state = pm._state_json(None)
    if sharded:
        W = bank.sharding.world_size
        bank.sync()
        meta = {"format": fmt, "rank": str(rank), "world_size": str(W), "num_users": str(bank.num_users),
                "frozen_users": json.dumps(bank.frozen)}
        write_safetensors(os.path.join(directory, SHARD_FILE.format(rank=rank, world=W)), bank.save_entries(), meta)
        state["frozen_users"] = []  # each shard file lists its own
        state["user_shards"] = {"world_size": W, "files": [SHARD_FILE.format(rank=r, world=W) for r in range(W)]}
    if rank == 0:
        write_safetensors(os.path.join(directory, weights_name), entries, {"format": fmt})
        with open(os.path.join(directory, config_name), "w") as f:
            json.dump(state, f, indent=2)
    if dist is not None:
        dist.barrier()


class UserRowsSource:
    """Where ``from_pretrained(base, dir, rank=, world_size=)`` takes the user rows
    from: the shard files of a sharded save, or the rows of a full save, for the users
    of rank ``rank`` of ``world_size`` (every user when no rank is given)."""

    def __init__(self, directory: str, meta: dict, rank: Optional[int], world_size: Optional[int]):
        if (rank is None) != (world_size is None):
            raise ValueError(f"give rank and world_size together, got rank={rank!r}, world_size={world_size!r}")
        self.directory, self.meta = directory, meta
        self.num_users = int(meta["config"]["num_users"])
        self.sharding = UserSharding(rank, world_size) if world_size is not None and world_size > 1 else None
        if self.sharding is not None and self.num_users < world_size:
            raise ValueError(f"{directory} holds {self.num_users} users: fewer than world_size={world_size}")
        self.ids = self.sharding.owned(self.num_users) if self.sharding else list(range(self.num_users))

    @classmethod
    def open(cls, directory: str, meta: dict, rank: Optional[int], world_size: Optional[int],
             mmap: bool = False) -> Optional["UserRowsSource"]:
        """The source of a load that needs one (a sharded save, or a rank given), else None."""
        if "user_shards" not in meta and rank is None and world_size is None:
            return None
        if mmap:
            raise ValueError("mmap=True maps one full save's file: it does not combine with a sharded save "
                             "or with rank / world_size")
        return cls(directory, meta, rank, world_size)

    def local_config(self, cfg):
        """``cfg`` with this rank's number of users (the model is built with these rows)."""
        return _local_config(cfg, len(self.ids))

    def adopt(self, pm) -> None:
        """Make the freshly built ``pm`` (its bank: this rank's users) rank ``rank`` of a
        user-sharded model of the saved number of users."""
        if self.sharding is None:
            return
        inner = pm.user_bank
        inner.config = _local_config(pm.proper_config, len(self.ids))
        pm.proper_config.num_users = self.num_users
        _adopt(pm, inner, self.sharding, inner.names)

    def rows(self, pm, tensors: Dict[str, Tensor], used: Set[str]) -> Dict[str, Tensor]:
        """The user state of :attr:`ids` (``{key: [len(ids), ...]}``) from the shard
        files, or from ``tensors`` (a full save; their keys go into ``used``)."""
        out = {key: torch.empty((len(self.ids),) + tuple(p.shape[1:]), dtype=p.dtype)
               for key, p in pm.user_bank.tensors()}
        info = self.meta.get("user_shards")
        if not info:
            self._fill(out, tensors.get, 0, 1)
            used.update(out)
            return out
        for src_rank, f in enumerate(self._shard_files()):
            self._fill(out, lambda key: f.tensor(key) if key in f.entries else None, src_rank, info["world_size"])
        return out

    def _shard_files(self) -> Iterator[SafetensorsFile]:
        """The shard files of a sharded save, in rank order, checked and mapped (:mod:`.bank_io`)."""
        for name in self.meta["user_shards"]["files"]:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: a shard file of this sharded save is missing")
            yield SafetensorsFile(path)

    def _fill(self, out: Dict[str, Tensor], get, src_rank: int, src_world: int) -> None:
        """Copy into ``out`` the rows of :attr:`ids` that a source holds: the users u with
        u % src_world == src_rank, at its row u // src_world."""
        wanted = torch.tensor(self.ids, dtype=torch.long)
        here = wanted[wanted % src_world == src_rank]
        if not here.numel():
            return
        pos, src = torch.searchsorted(wanted, here), torch.div(here, src_world, rounding_mode="floor")
        for key, dst in out.items():
            t = get(key)
            if t is None or tuple(t.shape[1:]) != tuple(dst.shape[1:]) or t.shape[0] <= int(src[-1]):
                raise ValueError(f"{self.directory}: user tensor {key!r} is missing or of shape "
                                 f"{None if t is None else list(t.shape)}; expected [>{int(src[-1])}, "
                                 f"{', '.join(map(str, dst.shape[1:]))}]")
            dst[pos] = t[src].to(dst.dtype)

    @property
    def frozen(self) -> List[int]:
        """The frozen users among :attr:`ids` (from the shard files, or the config)."""
        if self.meta.get("user_shards"):
            frozen = [u for f in self._shard_files() for u in json.loads(f.metadata.get("frozen_users", "[]"))]
        else:
            frozen = self.meta.get("frozen_users", [])
        mine = set(self.ids)
        return sorted(u for u in frozen if u in mine)
