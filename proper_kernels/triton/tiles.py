"""Tile schedule of the segment kernels (pure torch: importable without triton).

Tokens sorted by user (a RoutingPlan's ``order``) are cut into tiles of at most
``block_m`` positions that never straddle two buckets, so a tile reads one user's
adapter. Bucket b spans sorted positions [seg_offsets[b], seg_offsets[b + 1]).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["segment_tiles"]


def segment_tiles(seg_offsets: Tensor, T: int, block_m: int) -> Tuple[Tensor, Tensor, int]:
    """(tile_bucket [G] int32, tile_start [G] int32, G) for the buckets of seg_offsets.

    Tile i covers sorted positions [tile_start[i], min(tile_start[i] + block_m,
    seg_offsets[b + 1])) of bucket b = tile_bucket[i]; -1 marks padding tiles that
    cover nothing. G is a host-side bound that depends on (T, number of buckets,
    block_m) only, so kernels launched over it never sync or recompile per batch.
    """
    nb = seg_offsets.numel() - 1
    G = min(T, -(-T // block_m) + nb) if T else 0
    off = seg_offsets.long()
    tiles = (off[1:] - off[:-1] + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    i = torch.arange(G, device=seg_offsets.device)
    b = torch.searchsorted(cum, i, right=True)
    valid = b < nb
    b = b.clamp(max=nb - 1)
    start = off[b] + (i - (cum[b] - tiles[b])) * block_m
    tile_bucket = torch.where(valid, b, torch.full_like(b, -1)).to(torch.int32)
    tile_start = torch.where(valid, start, torch.zeros_like(start)).to(torch.int32)
    return tile_bucket, tile_start, G
