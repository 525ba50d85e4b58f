"""Tile schedule of the segment kernels (pure torch: importable without triton).

Tokens sorted by user (a RoutingPlan's ``order``) are cut into tiles of at most
``block_m`` positions that never straddle two buckets, so a tile reads one user's
adapter. Bucket b spans sorted positions [seg_offsets[b], seg_offsets[b + 1]).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["segment_tiles", "segment_chunks"]


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


def segment_chunks(seg_offsets: Tensor, T: int, chunk: int) -> Tuple[Tensor, Tensor, int, int]:
    """Chunk table of the token-split segment reductions (``_seg_xty`` in mixture_bwd).

    Bucket b (positions [seg_offsets[b], seg_offsets[b + 1])) is cut into
    ceil(len_b / chunk) chunks of ``chunk`` positions (the last one shorter). A bucket
    with one chunk is "solo": its program writes the bucket's result directly. The
    chunks of a bucket with several write partials into workspace rows
    [ws_off[b], ws_off[b + 1]) in chunk order, which a second pass adds up in that
    order (deterministic, no atomics).

    Returns (table [3, C] int32, ws_off [nb + 1] int32, C, W):
        table[0, i]: the chunk's bucket (-1: padding chunk that covers nothing);
        table[1, i]: its first position (it ends at min(start + chunk, seg_offsets[b + 1]));
        table[2, i]: its workspace row (-1: solo, or padding).
    C = min(T, cdiv(T, chunk) + nb) bounds the chunks and W = T // chunk + T // (chunk + 1)
    (< 2 T / chunk) the workspace rows: a bucket with L > chunk positions has
    ceil(L / chunk) <= L // chunk + 1 chunks, there are at most T // (chunk + 1) such
    buckets, and their L // chunk add up to at most T // chunk. Both bounds depend on
    (T, nb, chunk) only: built with tensor ops on the offsets' device, no host sync.
    """
    nb = seg_offsets.numel() - 1
    bucket, start, C = segment_tiles(seg_offsets, T, chunk)
    W = T // chunk + T // (chunk + 1)
    off = seg_offsets.long()
    nch = (off[1:] - off[:-1] + chunk - 1) // chunk
    wn = torch.where(nch > 1, nch, torch.zeros_like(nch))
    wcum = torch.cumsum(wn, 0)
    ws_off = torch.zeros(nb + 1, dtype=torch.int32, device=seg_offsets.device)
    ws_off[1:] = wcum.to(torch.int32)
    valid = bucket >= 0
    b = bucket.long().clamp(min=0)
    k = (start.long() - off[b]) // chunk
    row = torch.where(valid & (wn[b] > 0), wcum[b] - wn[b] + k, torch.full_like(k, -1))
    table = torch.stack([bucket, start, row.to(torch.int32)])
    return table, ws_off, C, W
