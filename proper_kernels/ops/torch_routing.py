"""The routing of a batch as the torch backend's variants read it: wide (every user of
the bank), one user owning the batch, or the plan's per-user tiles (segment)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .plan import RoutingPlan

# Wide with one user owning the batch multiplies T (N - 1) r_u (d_in + d_out) times
# by zero: from this many (~50 us of fp32 GEMM on one CPU core) that user's own rows
# run as plain GEMMs instead (on the CPU; measured cpu-small: wide 1.3x faster at
# T = 1, the user's rows 1.5x faster at T = 256).
ONE_USER_MIN_WASTE = 4_000_000



class _Routing(NamedTuple):
    """The routing of a batch as the variants read it.

    Three layouts of the user terms: ``wide`` (all N users' ranks, a one-hot keeps
    each token's own); one user owning the whole batch (segment; computed as wide over
    that one user, with no mask); and tiles (segment): the user tokens, in the plan's
    sorted order, cut into G tiles of L rows, each within one user's run, so that every
    per-user product is one batched GEMM over [G, L, ...]. ``rows`` holds the token of
    each tile row; the padding rows past a tile's end repeat some token, ``mask``
    zeroes them.
    """

    variant: str
    ids: Optional[Tensor]            # [T] int (-1 = no user); None: no user terms
    N: int
    user: int = -1                   # >= 0: this user owns every token of the batch
    G: int = 0                       # tiles: their number (0: no tiles)
    L: int = 0                       # tiles: rows per tile
    rows: Optional[Tensor] = None    # tiles: [G L] int64, the token of each tile row
    mask: Optional[Tensor] = None    # tiles: [G, L, 1] float32, 1 on rows that hold their tile's token; None: all do
    users: Optional[Tensor] = None   # tiles: [G] int64, the user of each tile; None: tile g is user g (G = N)
    masks: Optional[dict] = None     # wide: (compute dtype, r_u) -> its one-hot masks, built once per routing

    @property
    def wide(self) -> bool:
        """Whether the user terms run in the wide variant (every user of the bank)."""
        return self.variant == "wide" and self.N > 0




def _routing(variant: str, ids: Optional[Tensor], plan: Optional[RoutingPlan], N: int, r_u: int,
             d: int = 0) -> _Routing:
    """The routing of a call; ``d``: d_in + d_out of the layer (wide's waste). The
    routings of a plan (wide, and segment per user rank) are built at their first use
    and kept in the plan: it is shared by every layer of a batch, and so are they."""
    if ids is None or N == 0:
        return _Routing("wide", None, 0)
    if variant == "wide":
        # Traced code keeps no tensors between calls: its masks are built in the graph.
        if plan is None or torch.compiler.is_compiling():
            return _Routing("wide", ids, N, masks={})
        cache = plan.backend_cache
        # On the CPU, where the plan's segments cost no sync, one user owning a batch
        # large enough for wide's waste to matter runs as plain GEMMs over its rows.
        key = "wide"
        if ids.device.type == "cpu" and plan.num_tokens * (N - 1) * r_u * d >= ONE_USER_MIN_WASTE:
            user = _sole_user(_segments(plan))
            if user >= 0:
                key = "one-user"
                if key not in cache:
                    cache[key] = _Routing("segment", ids, N, user=user)
        if key not in cache:
            cache[key] = _Routing("wide", ids, N, masks={})
        return cache[key]
    if plan is None:
        plan = RoutingPlan(ids, N, check=False)
    cache = plan.backend_cache
    if r_u not in cache:
        cache[r_u] = _segment_routing(plan, ids, r_u)
    return cache[r_u]


def _segments(plan: RoutingPlan) -> list:
    """(user, start, end) of the plan's active users on the host (its one sync), once
    per plan."""
    cache = plan.backend_cache
    if "segments" not in cache:
        cache["segments"] = plan.segments()
    return cache["segments"]


def _sole_user(segs: list) -> int:
    """The user owning every token of the batch (none without a user), else -1."""
    return segs[0][0] if len(segs) == 1 and segs[0][1] == 0 else -1


def _segment_routing(plan: RoutingPlan, ids: Tensor, r_u: int) -> _Routing:
    """The segment layout of a batch. Tiles take the layout that moves the fewest
    floats (per unit of d_in + d_out) of three: one tile per user of the bank (N
    tiles of the longest run, inactive users all padding; the weights are read in
    place), one per active user (their weights gathered: 2 r_u per tile), or the runs
    cut at the mean run (at most twice as many tiles, for a skewed batch)."""
    segs = _segments(plan)
    T, N, dev = plan.num_tokens, plan.num_users, ids.device
    if not segs:
        return _Routing("segment", ids, N)
    if _sole_user(segs) >= 0:
        return _Routing("segment", ids, N, user=_sole_user(segs))
    n_user, A = T - segs[0][1], len(segs)
    longest, mean = max(e - s for _, s, e in segs), -(-n_user // A)
    n_split = sum(-(-(e - s) // mean) for _, s, e in segs)
    layout = min((N * longest, "bank"), (A * longest + 2 * A * r_u, "active"),
                 (n_split * mean + 2 * n_split * r_u, "split"))[1]
    if layout == "bank":
        L, off = longest, plan.seg_offsets.long()
        starts, ends, users = off[1:-1].unsqueeze(1), off[2:].unsqueeze(1), None
    else:
        L = longest if layout == "active" else mean
        tiles = torch.tensor([(u, p, min(p + L, e)) for u, s, e in segs for p in range(s, e, L)], device=dev)
        starts, ends, users = tiles[:, 1:2], tiles[:, 2:3], tiles[:, 0]
    pos = starts + torch.arange(L, device=dev)
    valid = pos < ends
    rows = plan.order.long()[pos.clamp(max=T - 1).view(-1)]
    mask = None if bool(valid.all()) else valid.unsqueeze(-1).to(torch.float32)
    return _Routing("segment", ids, N, -1, pos.shape[0], L, rows, mask, users)


