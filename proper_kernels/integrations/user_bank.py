"""``UserBank``: the per-user rows of every adapted layer, and the frozen users.

User ``u`` owns row ``u`` of four banked parameters of every adapted layer
(:class:`proper_kernels.layers.ProperLinear`):

    user_embedding [N, d_e]   e_u, the user part of the router's logits (W_e e_u)
    user_A         [N, r_u, d_in]
    user_B         [N, d_out, r_u]
    user_router    [N, K, r_u]  V_u, the LoRA-aware router

(a part the config leaves out is None). This module is the one place that reads,
writes, grows and pins those rows, and that names them: ProperModel's per-user
methods, its save/load and the PEFT import/export all go through a :class:`UserBank`.

A *user state* is ``{"<layer path>.<param>": tensor[len(users), ...]}``: the rows of
the given users, in the order the ids were given.

Users of another rank or LoRA scale share the bank (:meth:`UserBank.fit_rows`): a rank
r below the bank's r_u is zero-padded (A_u gets zero rows, B_u and V_u zero columns,
so the padding adds exact zeros), and B_u is multiplied by s / s_u, the adapter's
scale over the bank's, so s_u B_u A_u = s B A.

Where the rows live (``ProperConfig.user_bank``): :class:`UserBank` keeps them
*resident*, rows 0..N-1 of the layers' parameters on the compute device;
:class:`~proper_kernels.integrations.paged.PagedUserBank` keeps every row in host
memory and C device slots per layer. Both answer the same interface:

* rows by user id: :meth:`~UserBank.get_state`, :meth:`~UserBank.set_state`,
  :meth:`~UserBank.add`, :meth:`~UserBank.freeze` (and the names);
* routing: :meth:`~UserBank.route` turns a batch's user ids into the rows the kernels
  index (the ids themselves, or slot ids after paging the users in), once per batch;
* the lazy per-user optimiser (:mod:`.optim`): :meth:`~UserBank.begin_step` (the rows
  of the users of the batches since the last step, frozen users left out),
  :meth:`~UserBank.optim_state` (per-row AdamW state, one tensor per group of
  same-shaped parameters), :meth:`~UserBank.end_step`;
* persistence: :meth:`~UserBank.save_entries` (every row, a block at a time),
  :meth:`~UserBank.sync` (device rows back to the host; nothing to do when resident).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import ProperConfig

__all__ = ["UserBank", "USER_PARAMS", "UserIds", "UserName", "BankGroup", "bank_groups", "record_users"]

USER_PARAMS = ("user_embedding", "user_A", "user_B", "user_router")
# The rank axis of each banked parameter (user_embedding has none).
_RANK_DIM = {"user_A": 1, "user_B": 2, "user_router": 2}

UserIds = Union[int, Tensor, Sequence[int]]
UserName = Union[str, int]


class BankGroup(NamedTuple):
    """The banked parameters ``pname`` of ``layers`` whose rows have one shape and
    dtype: a bank moves, stores and steps them together (one transfer, one stacked
    optimiser update for all of them)."""
    pname: str
    keys: Tuple[str, ...]  # "<layer path>.<pname>", one per layer
    layers: Tuple[nn.Module, ...]
    row_shape: Tuple[int, ...]
    dtype: torch.dtype

    def params(self) -> List[nn.Parameter]:
        return [getattr(layer, self.pname) for layer in self.layers]


def bank_groups(layers: Sequence[Tuple[str, nn.Module]]) -> List[BankGroup]:
    """The banked parameters of ``layers`` grouped by (name, row shape, dtype), in
    :data:`USER_PARAMS` order, layers in order within a group."""
    found: Dict[tuple, List[Tuple[str, nn.Module]]] = {}
    for pname in USER_PARAMS:
        for name, layer in layers:
            p = getattr(layer, pname)
            if p is not None:
                found.setdefault((pname, tuple(p.shape[1:]), p.dtype), []).append((f"{name}.{pname}", layer))
    return [BankGroup(pname, tuple(k for k, _ in kl), tuple(m for _, m in kl), shape, dtype)
            for (pname, shape, dtype), kl in found.items()]


def record_users(layers: Sequence[Tuple[str, nn.Module]]) -> bool:
    """Whether a forward now takes part in an optimiser step: grad mode on and a
    banked parameter that trains (its users are then in the step's batch)."""
    return torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for _, layer in layers for p in (getattr(layer, n) for n in USER_PARAMS))


def live_dist():
    """torch.distributed when a process group is up, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def data_parallel_world() -> int:
    """The size of the default process group, 1 when none is up."""
    dist = live_dist()
    return dist.get_world_size() if dist is not None else 1


class UserBank:
    """The per-user parameters of a set of adapted layers, addressed by user id.

    Args:
        layers: ``(module path, ProperLinear)`` of every adapted layer.
        config: the model's own :class:`ProperConfig`; ``config.num_users`` is the
            bank size, and :meth:`add` grows it.

    Frozen users (per-user early stopping): :meth:`freeze` keeps a copy of their rows,
    :meth:`restore_frozen` writes the copies back after each optimizer step.

    Named users: ``names`` maps a user's name (str or int, e.g. the PEFT adapter it
    came from) to its row; :meth:`set_names` adds names.

    This class keeps the rows resident: user u is row u of the layers' parameters.
    """

    mode = "resident"

    def __init__(self, layers: Sequence[Tuple[str, nn.Module]], config: ProperConfig):
        self.layers: List[Tuple[str, nn.Module]] = list(layers)
        self.config = config
        self.names: Dict[UserName, int] = {}  # user name -> row
        self._frozen: Dict[int, Dict[str, Tensor]] = {}  # user id -> its pinned rows, [1, ...] each
        self._frozen_stack: Optional[Tuple[List[int], Dict[str, Tensor]]] = None  # the pinned rows stacked
        self._touched: Optional[Tensor] = None  # bool [N]: users of the forwards since the last optimiser step
        self._optim: Dict[Tuple[str, ...], Dict[str, Tensor]] = {}  # group keys -> per-row AdamW state
        # Set by pm.shard_users: each rank then holds and steps only its own users.
        self.sharded = False

    @property
    def num_users(self) -> int:
        return self.config.num_users

    def tensors(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """``("<layer path>.<param>", parameter)`` of every banked parameter that
        exists, layer by layer in :data:`USER_PARAMS` order: [num_users, ...] when
        resident, the [user_cache_size, ...] device slots when paged."""
        for name, layer in self.layers:
            for pname in USER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    yield f"{name}.{pname}", p

    def index(self, users: UserIds) -> Tensor:
        """int64 [n] of the ids ``users`` (an int, a sequence or a tensor); raises
        ValueError naming the ids outside [0, num_users)."""
        ids = torch.as_tensor(users if not isinstance(users, int) else [users]).reshape(-1).long()
        bad = ids[(ids < 0) | (ids >= self.num_users)]
        if bad.numel():
            raise ValueError(f"unknown user id(s) {bad.tolist()}: the bank has {self.num_users} users "
                             f"(ids 0..{self.num_users - 1})")
        return ids

    def add(self, n: int) -> List[int]:
        """Grow every layer's bank by ``n`` users (fresh rows: B_u and V_u at zero, so
        a new user starts at the group-level output). Returns the new ids.

        The banked Parameters are replaced by larger ones (their ``requires_grad`` is
        kept): an optimizer built before holds the old ones."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        start = self.num_users
        for _, layer in self.layers:
            layer.add_users(n)
        self.config.num_users = start + n
        if self._touched is not None:
            self._touched = torch.cat([self._touched, self._touched.new_zeros(n)])
        for st in self._optim.values():
            for k, v in st.items():
                st[k] = torch.cat([v, v.new_zeros((v.shape[0], n) + tuple(v.shape[2:]))], 1)
        return list(range(start, start + n))

    def row_specs(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """``{"<layer>.<param>": (row shape, dtype)}`` of every banked parameter."""
        return {key: (tuple(p.shape[1:]), p.dtype) for key, p in self.tensors()}

    def get_state(self, users: UserIds) -> Dict[str, Tensor]:
        """Copies of the rows of ``users``: ``{"<layer>.<param>": tensor[len(users), ...]}``
        (on the parameters' device when resident, in host memory when paged)."""
        return self._read_rows(self.index(users))

    def _read_rows(self, idx: Tensor) -> Dict[str, Tensor]:
        return {key: p.detach()[idx.to(p.device)].clone() for key, p in self.tensors()}

    @torch.no_grad()
    def set_state(self, state: Dict[str, Tensor], users: UserIds, *, partial: bool = False) -> None:
        """Write the rows of ``state`` (as :meth:`get_state` returns) at ids ``users``,
        cast to each parameter's device and dtype. Every key and shape is checked
        before the first write: on an error nothing is written (KeyError for a missing
        entry, ValueError for a wrong shape or an entry this bank does not have).

        partial: ``state`` may leave parameters out; their rows are kept."""
        idx = self.index(users)
        writes = []
        for key, (row_shape, _) in self.row_specs().items():
            if key not in state:
                if partial:
                    continue
                raise KeyError(f"user state lacks {key!r}")
            src = state[key]
            if src.shape[0] != idx.numel() or tuple(src.shape[1:]) != row_shape:
                raise ValueError(f"{key}: got shape {list(src.shape)}, expected [{idx.numel()}, "
                                 f"{', '.join(map(str, row_shape))}] (ranks/dims must match the bank)")
            writes.append((key, src))
        extra = sorted(set(state) - {key for key, _ in writes})
        if extra:
            raise ValueError(f"user state has entries this model does not have: {extra[:4]}")
        self._write_rows(writes, idx)

    def _write_rows(self, writes: List[Tuple[str, Tensor]], idx: Tensor) -> None:
        params = dict(self.tensors())
        for key, src in writes:
            p = params[key]
            p[idx.to(p.device)] = src.to(device=p.device, dtype=p.dtype)

    def fit_rows(self, state: Dict[str, Tensor], rank: int, scale: float, source: str) -> Dict[str, Tensor]:
        """Rows of users of LoRA rank ``rank`` and scale ``scale`` (as a user state of
        that rank) in this bank's form: the rank axis zero-padded to the bank's
        ``user_rank`` and B_u multiplied by ``scale`` / the layer's s_u (in fp64,
        rounded once; copied as is when the scales are equal), so every row computes
        what it computed at its own rank and scale.

        Raises ValueError, naming ``source``, when ``rank`` exceeds the bank's rank."""
        bank_rank = self.config.user_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{source}: rank must be a positive int, got {rank!r}")
        if rank > bank_rank:
            raise ValueError(f"{source}: rank {rank} > the bank's user_rank {bank_rank}: a bank holds users of rank "
                             f"<= its own (smaller ranks are zero-padded); build the ProperModel with "
                             f"ProperConfig(user_rank={rank}) or more (ProperModel.from_peft_users sizes the bank "
                             f"to its largest adapter)")
        user_scale = {name: layer.user_scale for name, layer in self.layers}
        out = {}
        for key, t in state.items():
            layer, pname = key.rsplit(".", 1)
            if pname == "user_B" and layer in user_scale and scale != user_scale[layer]:
                t = t.double() * (scale / user_scale[layer])
            dim = _RANK_DIM.get(pname)
            if dim is not None and rank < bank_rank:  # a wrong shape stays wrong: set_state names it
                pad = list(t.shape)
                pad[dim] = bank_rank - rank
                t = torch.cat([t, t.new_zeros(pad)], dim)
            out[key] = t
        return out

    def set_names(self, names: Mapping[UserName, int]) -> None:
        """Name rows: ``{name: row}``, a name a str or an int. A row keeps one name
        (a new name of a named row replaces the old one); a name names one row."""
        rows = self.index(list(names.values())).tolist() if names else []
        if len(set(rows)) != len(rows):
            raise ValueError(f"two names for one row in {dict(names)}")
        for name in names:
            if isinstance(name, bool) or not isinstance(name, (str, int)):
                raise TypeError(f"user names must be str or int, got {type(name).__name__}: {name!r}")
        taken = set(rows)
        self.names = {n: r for n, r in self.names.items() if r not in taken and n not in names}
        self.names.update(zip(names, rows))

    # ------------------------------------------------------------------ frozen users
    @property
    def frozen(self) -> List[int]:
        """Ids of the frozen users, ascending."""
        return sorted(self._frozen)

    def freeze(self, users: UserIds, state: Optional[Dict[str, Tensor]] = None) -> None:
        """Pin the rows of ``users``: their current rows, or ``state`` (rows of these
        users in this order, written first). Freezing a frozen user re-pins it."""
        idx = self.index(users).tolist()
        if state is not None:
            self.set_state(state, idx)
        if not idx:
            return
        snap = self.get_state(idx)
        for i, u in enumerate(idx):
            self._frozen[u] = {k: v[i:i + 1] for k, v in snap.items()}
        self._frozen_stack = None

    def unfreeze(self, users: Optional[UserIds] = None) -> None:
        """Unpin ``users`` (default: every frozen user); their current rows stay."""
        if users is None:
            self._frozen.clear()
        else:
            for u in self.index(users).tolist():
                self._frozen.pop(u, None)
        self._frozen_stack = None

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the pinned rows of every frozen user back: one indexed write per
        banked parameter, however many users are frozen."""
        if not self._frozen:
            return
        if self._frozen_stack is None:
            ids = sorted(self._frozen)
            self._frozen_stack = (ids, self._pinned_rows(ids))
        ids, rows = self._frozen_stack
        self.set_state(rows, ids)

    def _pinned_rows(self, ids: List[int]) -> Dict[str, Tensor]:
        """The pinned rows of the frozen users ``ids`` (non-empty), as a user state."""
        return {k: torch.cat([self._frozen[u][k] for u in ids], 0) for k in self._frozen[ids[0]]}

    # ------------------------------------------------------------------ routing
    def route(self, ids: Tensor) -> Tuple[Tensor, int]:
        """(row ids, rows) of a batch whose user ids ``ids`` (int, -1 = no user) were
        checked against num_users: the ids the kernels index and the row count of the
        tensors they index. Resident: ``(ids, num_users)``. Called once per forward or
        generate; a forward that trains user rows (:func:`record_users`) adds its users
        to the next optimiser step's batch."""
        if record_users(self.layers):
            if self._touched is None or self._touched.numel() != self.num_users:
                self._touched = torch.zeros(self.num_users, dtype=torch.bool, device=ids.device)
            self._touched[ids[ids >= 0].to(self._touched.device)] = True
        return ids, self.num_users

    # ------------------------------------------------------------------ lazy optimiser
    def groups(self) -> List[BankGroup]:
        """The banked parameters grouped by (name, row shape, dtype)."""
        return bank_groups(self.layers)

    def begin_step(self) -> Optional[Tensor]:
        """Rows to step now (int64 on the parameters' device): the users of the forwards
        that trained since the last step, frozen users left out; None when there are none."""
        if data_parallel_world() > 1 and not self.sharded:
            # Every rank holds every user and DDP averages every row's gradient: a user of
            # any rank's batch steps on every rank, as in one process on the union batch.
            if self._touched is None or self._touched.numel() != self.num_users:
                groups = self.groups()
                dev = groups[0].params()[0].device if groups else torch.device("cpu")
                self._touched = torch.zeros(self.num_users, dtype=torch.bool, device=dev)
            seen = self._touched.to(torch.int32)
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
            self._touched = seen.bool()
        if self._touched is None:
            return None
        mask = self._touched.clone()
        if self._frozen:
            mask[torch.tensor(sorted(self._frozen), device=mask.device)] = False
        return mask.nonzero().squeeze(-1)

    def optim_state(self) -> Iterator[Tuple[List[nn.Parameter], Dict[str, Tensor]]]:
        """(parameters of a group, its per-row AdamW state ``{"exp_avg", "exp_avg_sq":
        [layers, rows, *row], "step": [layers, rows] float32}``; rows: the bank's N when resident, its C device
        slots when paged), created at zero on first use."""
        for g in self.groups():
            params = g.params()
            st = self._optim.get(g.keys)
            if st is not None and st["step"].device != params[0].device:  # the model moved
                st = self._optim[g.keys] = {k: v.to(params[0].device) for k, v in st.items()}
            if st is None:
                shape, dev = (len(params),) + tuple(params[0].shape), params[0].device
                dt = params[0].dtype  # the rows' now (a paged bank's groups are those of its build; a cast may follow)
                st = self._optim[g.keys] = {"exp_avg": torch.zeros(shape, dtype=dt, device=dev),
                                            "exp_avg_sq": torch.zeros(shape, dtype=dt, device=dev),
                                            "step": torch.zeros(shape[:2], dtype=torch.float32, device=dev)}
            yield params, st

    def end_step(self, rows: Optional[Tensor]) -> None:
        """The rows of :meth:`begin_step` were stepped: the next step starts a new batch."""
        if self._touched is not None:
            self._touched.zero_()

    # ------------------------------------------------------------------ persistence and memory
    def sync(self) -> None:
        """Write rows changed on the device back to the host bank (resident: nothing to do)."""

    def save_entries(self) -> List[Tuple[str, torch.dtype, Tuple[int, ...], Iterator[Tensor]]]:
        """``(key, dtype, shape [num_users, ...], row blocks)`` of every banked parameter,
        group by group (a group's layers one after another), for
        :func:`~proper_kernels.integrations.bank_io.write_safetensors`."""
        params = dict(self.tensors())
        return [(k, g.dtype, (self.num_users,) + g.row_shape, iter([params[k].detach()]))
                for g in self.groups() for k in g.keys]

    def device_bytes(self) -> int:
        """Bytes of the user part on the compute device: rows, their gradients, optimiser state."""
        n = sum(p.numel() * p.element_size() for _, p in self.tensors())
        n += sum(p.grad.numel() * p.grad.element_size() for _, p in self.tensors() if p.grad is not None)
        return n + sum(v.numel() * v.element_size() for st in self._optim.values() for v in st.values())

    def host_bytes(self) -> int:
        """Bytes of the user part held in host memory (resident: none)."""
        return 0
