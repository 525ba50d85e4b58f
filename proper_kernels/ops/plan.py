"""The routing plan: built once per batch from the user ids, reused by every layer.

Tokens are grouped by user through a stable sort *of indices* (x itself is never
copied). Bucket 0 holds the tokens without a user (id -1), bucket ``u + 1`` the
tokens of user ``u``; bucket ``b`` is ``order[seg_offsets[b]:seg_offsets[b + 1]]``.

Everything is computed with tensor ops on the ids' device, with no atomics (the
segment offsets are a search in the sorted ids, not a bincount, which syncs on CUDA).
The one host sync is the range check of the ids: skip it with ``check=False`` when
the ids are known to be valid, e.g. to build the plan inside a captured CUDA graph
(on the CPU the check always runs: it costs no sync there). ``active_users`` syncs
lazily on first use.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..runtime.tiling import segment_tiles

__all__ = ["RoutingPlan", "plan"]


class RoutingPlan:
    """Per-batch grouping of tokens by user.

    Attributes:
        user_ids:    [T] int32, flat user id of every token (-1 = no user).
        num_users:   N, the size of the user bank the ids index.
        num_tokens:  T.
        order:       [T] int32, token indices stably sorted by user (no-user first).
        seg_offsets: [N + 2] int32, bucket b spans order[seg_offsets[b]:seg_offsets[b+1]];
                     bucket 0 is "no user", bucket u + 1 is user u.
        counts:      [N] int32, tokens per user.
    """

    def __init__(self, user_ids: Tensor, num_users: int, *, check: bool = True):
        if not isinstance(user_ids, Tensor):
            raise TypeError(f"user_ids must be a torch.Tensor, got {type(user_ids).__name__}")
        if user_ids.dtype.is_floating_point or user_ids.dtype.is_complex or user_ids.dtype == torch.bool:
            raise TypeError(f"user_ids must be an integer tensor, got dtype {user_ids.dtype}")
        if isinstance(num_users, bool) or not isinstance(num_users, numbers.Integral) or num_users < 0:
            raise ValueError(f"num_users must be a non-negative int, got {num_users!r}")
        num_users = int(num_users)
        ids = user_ids.reshape(-1)
        if (check or ids.device.type == "cpu") and ids.numel() > 0:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= num_users:
                raise ValueError(
                    f"user_ids must lie in [-1, {num_users}) (num_users={num_users}), "
                    f"got values in [{lo}, {hi}]"
                )
        self.user_ids = ids.to(torch.int32)
        # The tensor the plan belongs to, and its version: a call that passes other ids
        # (or these ids modified in place) is caught by :meth:`check_ids`.
        self.source = user_ids
        # Inference tensors keep no version: their plans compare the ids by value.
        self.source_version = None if user_ids.is_inference() else user_ids._version
        self.num_users = num_users
        self.num_tokens = ids.numel()
        self.device = ids.device
        bucket = ids.long() + 1  # 0 = no user
        # A stable sort keeps each user's tokens in their original order, which makes
        # every per-user reduction deterministic.
        sorted_bucket, order = torch.sort(bucket, stable=True)
        self.order = order.to(torch.int32)
        # Bucket b starts at the first sorted position whose bucket is >= b.
        buckets = torch.arange(num_users + 2, dtype=sorted_bucket.dtype, device=ids.device)
        offsets = torch.searchsorted(sorted_bucket, buckets)
        self.seg_offsets = offsets.to(torch.int32)
        self.counts = (offsets[2:] - offsets[1:-1]).to(torch.int32)
        self._active: Optional[Tensor] = None
        self._tiles: Dict[int, Tuple[Tensor, Tensor, int]] = {}
        # What a backend derives from the plan once for every layer of the batch (the
        # torch backend's routings).
        self.backend_cache: dict = {}

    def check_ids(self, user_ids: Tensor, name: str = "user_ids") -> None:
        """Raise ValueError unless ``user_ids`` are the ids this plan was built from.

        The tensor the plan was built from (or a view of its memory of the same shape),
        unmodified since, passes without reading it (an inference tensor has no version
        to tell, so it is compared by value like any other). Another tensor is compared by
        value: at once on the CPU; on CUDA by an asynchronous device assertion, which
        needs no host sync and fails the next synchronising call."""
        src = self.source
        if user_ids is self.user_ids:
            return
        if torch.compiler.is_compiling():
            # Traced code has no storage pointers or versions: compare by value, with an
            # assertion that the compiled graph keeps.
            if user_ids is not src:
                differ = (user_ids.reshape(-1).to(torch.int32) != self.user_ids).any()
                torch._assert_async(~differ, f"{name} differ from the ids the plan was built from")
            return
        same_memory = (user_ids is src or (user_ids.data_ptr() == src.data_ptr() and user_ids.shape == src.shape
                                           and user_ids.stride() == src.stride() and user_ids.device == src.device))
        if same_memory and self.source_version is not None and not user_ids.is_inference():
            if user_ids._version != self.source_version:
                raise ValueError(f"plan was built from {name} before they were modified in place "
                                 f"(version {self.source_version}, now {user_ids._version}): rebuild it with "
                                 "pk.plan(user_ids, num_users)")
            return
        flat = user_ids.reshape(-1)
        if flat.numel() != self.num_tokens:
            raise ValueError(f"plan was built for {self.num_tokens} tokens but {name} has {flat.numel()}")
        differ = (flat.to(torch.int32) != self.user_ids).any()
        if flat.device.type == "cuda":
            torch._assert_async(~differ, f"{name} differ from the ids the plan was built from")
        elif bool(differ):
            bad = int((flat.to(torch.int32) != self.user_ids).nonzero()[0])
            raise ValueError(f"plan does not belong to {name}: token {bad} has {name} {int(flat[bad])} but the plan "
                             f"was built with user {int(self.user_ids[bad])}; rebuild it with "
                             "pk.plan(user_ids, num_users) for this batch")

    @property
    def active_users(self) -> Tensor:
        """[A] int64, the users with at least one token, ascending (syncs once)."""
        if self._active is None:
            self._active = torch.nonzero(self.counts > 0).squeeze(-1)
        return self._active

    @property
    def num_no_user(self) -> Tensor:
        """0-dim int32 tensor: how many tokens have no user."""
        return self.seg_offsets[1]

    def tile_table(self, block_m: int) -> Tuple[Tensor, Tensor, int]:
        """Tiles of at most ``block_m`` sorted tokens, each within one bucket.

        Returns (tile_bucket [G] int32, tile_start [G] int32, G) where tile i covers
        sorted positions [tile_start[i], min(tile_start[i] + block_m, seg_offsets[b+1]))
        of bucket b = tile_bucket[i] (-1 for padding tiles that cover nothing, b - 1 is
        the user id). G is a host-side upper bound, a function of (T, N, block_m)
        only, so kernels launched over it never recompile or sync per batch.
        """
        if block_m not in self._tiles:
            self._tiles[block_m] = segment_tiles(self.seg_offsets, self.num_tokens, block_m)
        return self._tiles[block_m]

    def segments(self):
        """Host-side list of (user, start, end) over the sorted order, active users only."""
        off = self.seg_offsets.tolist()
        return [(u, off[u + 1], off[u + 2]) for u in range(self.num_users) if off[u + 2] > off[u + 1]]

    def __repr__(self) -> str:
        return f"RoutingPlan(num_tokens={self.num_tokens}, num_users={self.num_users}, device={self.device})"


def plan(user_ids: Tensor, num_users: int, *, check: bool = True) -> RoutingPlan:
    """Build the routing plan of a batch: ``plan(user_ids, num_users)``.

    Args:
        user_ids: int tensor of any shape (one id per token, -1 = no user).
        num_users: N, the number of users in the bank; ids must lie in [-1, N).
        check: validate the id range (one host sync).
    """
    return RoutingPlan(user_ids, num_users, check=check)
