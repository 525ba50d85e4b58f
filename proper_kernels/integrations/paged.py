"""The paged user bank: every user's rows in host memory, C device slots per layer.

``ProperConfig(user_bank="paged", user_cache_size=C)``. Each adapted layer's banked
parameters (e_u, A_u, B_u, V_u) are [C, ...] device *slots*; the rows of all N users,
and their optimiser state, live in host memory (:class:`RowStore`), optionally as a
copy-on-write map of a safetensors file. Per forward or generate
(:meth:`PagedUserBank.route`):

1. the batch's distinct users are made resident: a cached user costs nothing, the
   others take the least recently used slots (empty ones first); a slot whose rows
   changed since they came in is written back to the host first;
2. the user ids become slot ids once, for the routing plan that every layer shares:
   the kernels run unchanged on [C, ...] tensors and ids in [-1, C).

Rows move per *group* (the parameters of one name, row shape and dtype, e.g. A_u of
every q_proj and v_proj): the rows of all the users a batch brings in are gathered
from the host in one pass ([layers, users, *row]) and sent in one copy, then placed
into each layer's slots on the device; write-backs likewise. On CUDA the host side
gathers into pinned memory and the copies run on a side stream: the copy to the
device overlaps the previous step's kernels and the write-back of evicted rows
overlaps the forward (it is finished, on the host, at the next batch).

Training: the slots of the users of the forwards since the last optimiser step are
held (they carry gradients) until :class:`~proper_kernels.integrations.optim.ProperOptimizer`
steps them; the moments and step count of a user's rows page in at its first step
in a slot and out with its rows. A batch (or an accumulation of batches) needing
more than C users raises, naming C.

Host memory: the rows of every user (B_u and V_u of users never trained are zero and
take no memory until written) plus the optimiser state of the users that trained.
The bank keeps no second copy: ``save_pretrained`` streams it to the file a chunk at a
time and ``add_users`` appends a chunk.
"""
from __future__ import annotations

import contextlib
import math
import mmap as _mmap
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .bank_io import SafetensorsFile
from .config import ProperConfig
from .user_bank import BankGroup, UserBank, bank_groups, data_parallel_world, record_users

__all__ = ["PagedUserBank", "RowStore"]

def zero_rows(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A zero tensor whose memory is taken only where it is written: a private
    anonymous map on Linux (the kernel's zero page until a page is written; no swap
    reserved, so a bank may be larger than memory as long as what trains fits),
    plain zeros elsewhere."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not sys.platform.startswith("linux") or nbytes < (1 << 20):
        return torch.zeros(shape, dtype=dtype)
    flags = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | getattr(_mmap, "MAP_NORESERVE", 0x4000)
    return torch.frombuffer(_mmap.mmap(-1, nbytes, flags=flags), dtype=dtype).view(tuple(shape))


class RowStore:
    """Rows of ``layers`` tensors of one row shape, by user, in host memory.

    Chunks along the user axis, each [layers, n, *row_shape]: the initial rows, then
    one per :meth:`append` (appending never copies the chunks there are). A chunk
    given as values is kept as is (rows drawn at random, or a map of a file); zero
    rows are :func:`zero_rows`, whose memory is taken row by row as they are written.
    ``written`` counts, per lazily backed chunk, the rows ever written (what they hold).
    """

    def __init__(self, layers: int, row_shape: Sequence[int], dtype: torch.dtype):
        self.layers, self.row_shape, self.dtype = layers, tuple(row_shape), dtype
        self.chunks: List[Tensor] = []
        self.starts: List[int] = []
        self.written: List[Optional[Tensor]] = []  # bool [n] for a lazily backed chunk, None for an allocated one
        self._starts_t = torch.zeros(0, dtype=torch.long)
        self.num_rows = 0

    def append(self, n: int, values: Optional[Tensor] = None, lazy: bool = False) -> None:
        """Add ``n`` rows: ``values`` [layers, n, *row] (not copied; ``lazy``: memory
        taken as written, e.g. a map of a file), or zeros."""
        if values is None:
            values, lazy = zero_rows((self.layers, n) + self.row_shape, self.dtype), True
        want = (self.layers, n) + self.row_shape
        if tuple(values.shape) != want or values.dtype != self.dtype:
            raise ValueError(f"rows of shape {list(values.shape)} {values.dtype}, expected {list(want)} {self.dtype}")
        self.starts.append(self.num_rows)
        self.chunks.append(values)
        self.written.append(torch.zeros(n, dtype=torch.bool) if lazy else None)
        self._starts_t = torch.tensor(self.starts)
        self.num_rows += n

    def _parts(self, ids: Tensor) -> Iterator[Tuple[int, Optional[Tensor], Tensor]]:
        """(chunk, positions in ids or None for all, ids within the chunk) per chunk hit."""
        if len(self.chunks) == 1:
            yield 0, None, ids
            return
        c = torch.searchsorted(self._starts_t, ids, right=True) - 1
        for ci in torch.unique(c).tolist():
            pos = (c == ci).nonzero().squeeze(-1)
            yield ci, pos, ids[pos] - self.starts[ci]

    def gather(self, ids: Tensor, out: Optional[Tensor] = None, layer: Optional[int] = None) -> Tensor:
        """The rows ``ids`` (int64 [k], CPU): [layers, k, *row] (of one ``layer``: [k, *row])."""
        lead = () if layer is not None else (self.layers,)
        if out is None:
            out = torch.empty(lead + (ids.numel(),) + self.row_shape, dtype=self.dtype)
        dim = 0 if layer is not None else 1
        for ci, pos, local in self._parts(ids):
            chunk = self.chunks[ci] if layer is None else self.chunks[ci][layer]
            if pos is None:
                torch.index_select(chunk, dim, local, out=out)
            else:
                out.index_copy_(dim, pos, chunk.index_select(dim, local))
        return out

    def scatter(self, ids: Tensor, src: Tensor, layer: Optional[int] = None) -> None:
        """Write ``src`` ([layers, k, *row], or [k, *row] for one ``layer``) at rows ``ids``."""
        dim = 0 if layer is not None else 1
        for ci, pos, local in self._parts(ids):
            chunk = self.chunks[ci] if layer is None else self.chunks[ci][layer]
            part = src if pos is None else src.index_select(dim, pos)
            chunk.index_copy_(dim, local, part.to(self.dtype))
            if self.written[ci] is not None:
                self.written[ci][local] = True

    def blocks(self, layer: int) -> Iterator[Tensor]:
        """Every row of ``layer`` in order, a chunk at a time ([n, *row] each)."""
        for chunk in self.chunks:
            yield chunk[layer]

    def nbytes(self) -> int:
        """Bytes the rows take: allocated chunks whole, lazily backed ones by the rows written."""
        row = self.layers * math.prod(self.row_shape) * torch.empty((), dtype=self.dtype).element_size()
        return sum(c.numel() * c.element_size() if w is None else int(w.sum()) * row
                   for c, w in zip(self.chunks, self.written))


def _fresh_rows(g: BankGroup, n: int) -> Optional[Tensor]:
    """Rows of ``n`` new users for group ``g``, as :class:`ProperLinear` initialises its
    bank: A_u uniform(+-1/sqrt(d_in)) (kaiming, as nn.Linear), e_u N(0, 0.02^2); None
    (zeros) for B_u and V_u."""
    shape = (len(g.layers), n) + g.row_shape
    if g.pname == "user_A":
        bound = 1.0 / math.sqrt(g.row_shape[-1])
        return torch.empty(shape, dtype=g.dtype).uniform_(-bound, bound)
    if g.pname == "user_embedding":
        return (torch.randn(shape) * 0.02).to(g.dtype)
    return None


class _Transfers:
    """Host <-> device copies of a paged bank. CPU: plain copies. CUDA: through pinned
    host memory on a side stream; a copy back to the host finishes (its rows land in
    the host store) at :meth:`finish`."""

    def __init__(self):
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._pending: List[Tuple[object, Tensor, object]] = []  # (event, pinned rows, callback(rows))

    def side(self, device: torch.device):
        if device.type != "cuda":
            return contextlib.nullcontext()
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return torch.cuda.stream(self._streams[device])

    @staticmethod
    def host_buffer(shape, dtype, device: torch.device) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")

    @staticmethod
    def to_device(rows: Tensor, device: torch.device) -> Tensor:
        """``rows`` on ``device``: an asynchronous copy on CUDA (from pinned memory: no
        host sync), so the host never waits for the queued compute."""
        if device.type != "cuda":
            return rows.to(device)
        return (rows if rows.is_pinned() else rows.pin_memory()).to(device, non_blocking=True)

    def to_host(self, rows: Tensor, done) -> None:
        """Copy device ``rows`` to the host and call ``done(host rows)`` (at once on CPU)."""
        if rows.device.type != "cuda":
            done(rows)
            return
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, done))

    def wait_compute(self, device: torch.device) -> None:
        """The side stream waits for the work queued so far on the compute stream."""
        if device.type == "cuda":
            self._streams[device].wait_stream(torch.cuda.current_stream(device))

    def join(self, device: torch.device) -> None:
        """The compute stream waits for the side stream's copies."""
        if device.type == "cuda" and device in self._streams:
            torch.cuda.current_stream(device).wait_stream(self._streams[device])

    def finish(self) -> None:
        pending, self._pending = self._pending, []
        for event, host, done in pending:
            event.synchronize()
            done(host)


class PagedUserBank(UserBank):
    """A :class:`UserBank` whose rows live in host memory, with ``config.user_cache_size``
    device slots per banked parameter (the layers' parameters, [C, ...]).

    Args:
        layers: ``(module path, ProperLinear)`` of every adapted layer, built with
            ``num_users = user_cache_size`` (their user parameters are the slots).
        config: the model's :class:`ProperConfig` (``num_users`` is the bank size N).
        source: a safetensors file holding ``<layer>.<param>`` [N, ...] for every banked
            parameter (a full save), read instead of initialising fresh rows.
        mmap: keep ``source``'s rows as a copy-on-write map of the file (pages are read
            when first used; writes stay in memory): N beyond host memory. Without it
            the rows are copied into host memory, one tensor at a time.
    """

    mode = "paged"

    def __init__(self, layers: Sequence[Tuple[str, nn.Module]], config: ProperConfig, *,
                 source: Optional[SafetensorsFile] = None, mmap: bool = False):
        super().__init__(layers, config)
        self.cache_size = C = config.user_cache_size
        self._groups = bank_groups(self.layers)
        for g in self._groups:
            for p in g.params():
                if p.shape[0] != C:
                    raise ValueError(f"{g.pname}: a paged bank's layers hold {C} slots, this one {p.shape[0]}")
        N = config.num_users
        self._rows = [RowStore(len(g.layers), g.row_shape, g.dtype) for g in self._groups]
        self._moments = [(RowStore(len(g.layers), g.row_shape, g.dtype), RowStore(len(g.layers), g.row_shape, g.dtype),
                          RowStore(len(g.layers), (), torch.float32)) for g in self._groups]
        for g, store in zip(self._groups, self._rows):
            if source is not None:
                rows, mapped = self._source_rows(g, source, mmap)
                store.append(N, rows, lazy=mapped)
            else:
                store.append(N, _fresh_rows(g, N))
        for ms in self._moments:
            for s in ms:
                s.append(N)
        self._slot_of = torch.full((N,), -1, dtype=torch.long)  # user -> slot (-1: in host memory only)
        self._user_of = torch.full((C,), -1, dtype=torch.long)  # slot -> user (-1: empty)
        self._last_used = torch.zeros(C, dtype=torch.long)
        self._held = torch.zeros(C, dtype=torch.bool)  # users of the batches since the last step
        self._dirty = torch.zeros(C, dtype=torch.bool)  # rows (and loaded state) changed since paged in
        self._state_in = torch.zeros(C, dtype=torch.bool)  # optimiser state paged in
        self._tick = 0
        self._stepping: Optional[Tensor] = None  # begin_step's slots, on the host
        self._rewritten_frozen: set = set()  # frozen users written by set_state since their pinning
        self._io = _Transfers()
        self.stats = dict(batches=0, hits=0, misses=0, evictions=0, bytes_to_device=0, bytes_to_host=0)

    def _source_rows(self, g: BankGroup, f: SafetensorsFile, mmap: bool) -> Tuple[Tensor, bool]:
        """(the rows of group ``g`` read from ``f``, whether they are a map of it)."""
        N = self.config.num_users
        for key in g.keys:
            if key not in f.entries:
                raise ValueError(f"{f.path}: missing tensor {key!r}")
            dtype, shape = f.entries[key][:2]
            if shape != (N,) + g.row_shape:
                raise ValueError(f"{key}: saved shape {list(shape)} != {[N, *g.row_shape]}")
        span = f.span(list(g.keys)) if mmap else None
        if span is not None and span.dtype == g.dtype:
            return span, True
        out = torch.empty((len(g.keys), N) + g.row_shape, dtype=g.dtype)
        for i, key in enumerate(g.keys):
            out[i].copy_(f.tensor(key))
        return out, False

    # ------------------------------------------------------------------ interface
    def groups(self) -> List[BankGroup]:
        return list(self._groups)

    def _device(self) -> torch.device:
        return self._groups[0].params()[0].device

    def row_specs(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """As the resident bank's: keys layer by layer, in :data:`USER_PARAMS` order."""
        specs = {k: (g.row_shape, g.dtype) for g in self._groups for k in g.keys}
        return {k: specs[k] for k, _ in self.tensors()}

    def add(self, n: int) -> List[int]:
        """Append ``n`` users (fresh rows, in host memory; nothing existing is copied)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        start = self.num_users
        if n:
            for g, store, ms in zip(self._groups, self._rows, self._moments):
                store.append(n, _fresh_rows(g, n))
                for s in ms:
                    s.append(n)
            self._slot_of = torch.cat([self._slot_of, self._slot_of.new_full((n,), -1)])
        self.config.num_users = start + n
        return list(range(start, start + n))

    def _read_rows(self, idx: Tensor) -> Dict[str, Tensor]:
        self.sync()
        out = {}
        for g, store in zip(self._groups, self._rows):
            rows = store.gather(idx)
            out.update((k, rows[i]) for i, k in enumerate(g.keys))
        return {k: out[k] for k, _ in self.tensors()}  # the resident bank's key order

    @torch.no_grad()
    def _write_rows(self, writes: List[Tuple[str, Tensor]], idx: Tensor) -> None:
        self._io.finish()
        self._rewritten_frozen.update(u for u in idx.tolist() if u in self._frozen)
        where = {k: (gi, i) for gi, g in enumerate(self._groups) for i, k in enumerate(g.keys)}
        slots = self._slot_of[idx]
        on = (slots >= 0).nonzero().squeeze(-1)
        dev = self._device()
        for key, src in writes:
            gi, i = where[key]
            self._rows[gi].scatter(idx, src.detach().cpu(), layer=i)
            if on.numel():
                p = self._groups[gi].params()[i]
                p.detach().index_copy_(0, slots[on].to(dev), src.detach()[on.to(src.device)].to(dev, p.dtype))

    def restore_frozen(self) -> None:
        """Write back the pinned rows of the frozen users that :meth:`set_state` wrote
        since they were pinned. Nothing else can move a frozen user's rows here: the
        optimiser (:meth:`ProperModel.make_optimizer`) skips them, so a step costs
        nothing per frozen user."""
        ids = sorted(u for u in self._rewritten_frozen if u in self._frozen)
        if ids:
            self.set_state(self._pinned_rows(ids), ids)
        self._rewritten_frozen.clear()

    def freeze(self, users, state: Optional[Dict[str, Tensor]] = None) -> None:
        super().freeze(users, state)
        self._rewritten_frozen.difference_update(self.index(users).tolist())  # pinned at what was just written

    # ------------------------------------------------------------------ routing
    def route(self, ids: Tensor) -> Tuple[Tensor, int]:
        """Page the users of ``ids`` in and return ``(slot ids, C)`` (-1 stays -1).

        Raises ValueError when the batch has more than C distinct users, or when the
        users of the batches since the last optimiser step (whose slots are held
        until it) and this batch's new users need more than C slots together."""
        training = record_users(self.layers)  # before no_grad
        with torch.no_grad():
            return self._route(ids, training)

    def _route(self, ids: Tensor, training: bool) -> Tuple[Tensor, int]:
        if training and not self.sharded and data_parallel_world() > 1:
            raise RuntimeError(
                "a paged user bank trained under data parallelism needs pm.shard_users(rank, world_size) "
                "before wrapping the model: otherwise each rank's cache slots hold other users and DDP would "
                "average their gradients together")
        self._io.finish()
        host_ids = ids.cpu()
        users = torch.unique(host_ids[host_ids >= 0])
        C = self.cache_size
        if users.numel() > C:
            raise ValueError(f"the batch has {users.numel()} distinct users but the paged user bank holds "
                             f"user_cache_size={C} of them on the device: split the batch, or raise "
                             f"ProperConfig.user_cache_size to at least {users.numel()}")
        slots = self._slot_of[users]
        new = users[slots < 0]
        self.stats["batches"] += 1
        self.stats["hits"] += int(users.numel() - new.numel())
        self.stats["misses"] += int(new.numel())
        if new.numel():
            self._page_in(new, self._free_slots(slots[slots >= 0], new.numel(), users.numel()))
        slots = self._slot_of[users]
        self._last_used[slots] = self._tick
        self._tick += 1
        if training:
            self._held[slots] = True
        rows = torch.where(host_ids >= 0, self._slot_of[host_ids.clamp(min=0)], host_ids)
        return (rows.pin_memory() if self._device().type == "cuda" else rows), C

    def _free_slots(self, cached: Tensor, need: int, batch_users: int) -> Tensor:
        """``need`` slots for new users: empty ones first, then least recently used;
        never a slot of this batch (``cached``) or one held for the next step."""
        ok = ~self._held
        ok[cached] = False
        cand = ok.nonzero().squeeze(-1)
        if cand.numel() < need:
            held = int(self._held.sum())
            raise ValueError(f"the paged user bank needs {need} free slots for this batch's new users but "
                             f"user_cache_size={self.cache_size} slots hold {batch_users - need} of its users and "
                             f"{held} users of earlier batches whose gradients wait for the optimiser step: call "
                             f"the optimiser from pm.make_optimizer() (its step releases them) before more users "
                             f"than user_cache_size={self.cache_size} accumulate, or raise user_cache_size")
        age = torch.where(self._user_of[cand] < 0, torch.full_like(cand, -1), self._last_used[cand])
        return cand[torch.sort(age, stable=True).indices[:need]]

    def _page_in(self, users: Tensor, slots: Tensor) -> None:
        dev = self._device()
        staged = []
        with self._io.side(dev):
            for g, store in zip(self._groups, self._rows):  # host gather + copy, before waiting on compute
                buf = self._io.host_buffer((len(g.layers), users.numel()) + g.row_shape, g.dtype, dev)
                staged.append(self._io.to_device(store.gather(users, out=buf), dev))
                self.stats["bytes_to_device"] += buf.numel() * buf.element_size()
            s_dev = self._io.to_device(slots, dev)
            self._io.wait_compute(dev)
            self._write_back(slots, evict=True)
            for g, rows in zip(self._groups, staged):
                for i, p in enumerate(g.params()):
                    p.detach().index_copy_(0, s_dev, rows[i].to(p.dtype))
                    if p.grad is not None:
                        p.grad.index_fill_(0, s_dev, 0)
        self._io.join(dev)
        self._user_of[slots] = users
        self._slot_of[users] = slots
        self._dirty[slots] = False
        self._state_in[slots] = False

    def _write_back(self, slots: Tensor, evict: bool) -> None:
        """Copy the changed rows (and optimiser state) of ``slots`` to the host; with
        ``evict`` the slots are emptied. Runs on the side stream on CUDA."""
        users = self._user_of[slots]
        keep = (users >= 0) & self._dirty[slots]
        if evict:
            self.stats["evictions"] += int((users >= 0).sum())
        w_slots, w_users = slots[keep], users[keep]
        if w_slots.numel():
            dev = self._device()
            s_dev = self._io.to_device(w_slots, dev)
            st_in = self._state_in[w_slots]
            s_sel = self._io.to_device(w_slots[st_in], dev)  # the slots whose optimiser state is in
            for gi, (g, store) in enumerate(zip(self._groups, self._rows)):
                rows = torch.stack([p.detach().index_select(0, s_dev) for p in g.params()]).to(g.dtype)
                self._send_home(rows, store, w_users)
                dst = self._optim.get(g.keys)
                if dst is not None and bool(st_in.any()):
                    u_sel = w_users[st_in]
                    for name, s in zip(("exp_avg", "exp_avg_sq", "step"), self._moments[gi]):
                        self._send_home(dst[name].index_select(1, s_sel), s, u_sel)
            self._dirty[w_slots] = False
        if evict:
            gone = users[users >= 0]
            self._slot_of[gone] = -1
            self._user_of[slots] = -1
            self._state_in[slots] = False

    def _send_home(self, rows: Tensor, store: RowStore, users: Tensor) -> None:
        self.stats["bytes_to_host"] += rows.numel() * rows.element_size()
        self._io.to_host(rows, lambda host, s=store, u=users.clone(): s.scatter(u, host))

    @torch.no_grad()
    def sync(self) -> None:
        """Write every slot's changed rows and optimiser state back to the host bank
        (the slots stay cached). ``save_pretrained`` calls it."""
        dev = self._device()
        with self._io.side(dev):
            self._io.wait_compute(dev)
            self._write_back(torch.arange(self.cache_size), evict=False)
        self._io.finish()

    # ------------------------------------------------------------------ lazy optimiser
    def begin_step(self) -> Optional[Tensor]:
        """Slots to step: held by the batches since the last step, frozen users left
        out. Their optimiser state is paged in (zeros for a user's first step)."""
        held = self._held & (self._user_of >= 0)
        if self._frozen:
            held &= ~torch.isin(self._user_of, torch.tensor(sorted(self._frozen)))
        slots = held.nonzero().squeeze(-1)
        need = slots[~self._state_in[slots]]
        if need.numel():
            dev = self._device()
            users = self._user_of[need]
            states = list(self.optim_state())  # created (once) outside the side stream
            with self._io.side(dev):
                staged = [[self._io.to_device(s.gather(users, out=self._io.host_buffer(
                    (s.layers, users.numel()) + s.row_shape, s.dtype, dev)), dev) for s in ms] for ms in self._moments]
                s_dev = self._io.to_device(need, dev)
                self._io.wait_compute(dev)
                for (_, st), rows in zip(states, staged):
                    for name, r in zip(("exp_avg", "exp_avg_sq", "step"), rows):
                        st[name].index_copy_(1, s_dev, r.to(st[name].dtype))
            self._io.join(dev)
            self._state_in[need] = True
        self._stepping = slots
        return self._io.to_device(slots, self._device())

    def end_step(self, rows: Optional[Tensor]) -> None:
        if rows is not None and self._stepping is not None:  # the host copy of begin_step's rows: no sync
            self._dirty[self._stepping] = True
        self._stepping = None
        self._held.zero_()

    # ------------------------------------------------------------------ persistence and memory
    def save_entries(self) -> List[Tuple[str, torch.dtype, Tuple[int, ...], Iterator[Tensor]]]:
        self.sync()
        return [(k, g.dtype, (self.num_users,) + g.row_shape, store.blocks(i))
                for g, store in zip(self._groups, self._rows) for i, k in enumerate(g.keys)]

    def resident_users(self) -> List[int]:
        """The users in device slots now, by slot."""
        return self._user_of[self._user_of >= 0].tolist()

    def host_bytes(self) -> int:
        """Bytes of rows and optimiser state in host memory (a mapped file's pages count
        in full: they are what the bank reads)."""
        return sum(s.nbytes() for s in self._rows) + sum(s.nbytes() for ms in self._moments for s in ms)
