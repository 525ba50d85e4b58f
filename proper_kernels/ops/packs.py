"""Packed GEMM layouts of adapter tensors, kept between calls while the tensors are
frozen (the torch backend's operands: ``proper_kernels.ops.torch_backend``)."""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
from torch import Tensor

__all__ = ["clear_pack_cache"]


def _cast(t: Optional[Tensor], cd: torch.dtype) -> Optional[Tensor]:
    return t if (t is None or t.dtype == cd) else t.to(cd)


# The GEMM layouts of the adapter tensors ([A_cat; W_r], the up-projections as one
# matrix, the router in rank space), in the compute dtype. Tensors that take no
# gradient (frozen: requires_grad False) keep theirs between calls, rebuilt when the
# tensor changes: another storage or shape, or a new version (every in-place write
# through the tensor or a view of it bumps it). Writes that bypass the version counter
# are not seen: anything done through ``t.data`` (``t.data.copy_(...)``, ``t.data =
# ...``) and collectives writing into the tensor (DistributedDataParallel's broadcast at
# construction, FSDP's all-gather): call clear_pack_cache() after them, or set
# PROPER_KERNELS_PACK_CACHE=0. Trainable tensors are packed once per forward and the
# pack is reused by its backward.
# id(first source) -> (a weak reference to it, {kind: (signature, packs, the sources kept alive)});
# an entry goes with its first source.
_PACKS: dict = {}
_PACK_CACHE = os.environ.get("PROPER_KERNELS_PACK_CACHE", "1") != "0"


def clear_pack_cache() -> None:
    """Drop every cached pack (after writes the version counter does not see)."""
    _PACKS.clear()


def _packed(kind, build, *sources: Optional[Tensor]):
    """build(*sources), cached while every source is frozen and unchanged."""
    if not _PACK_CACHE or torch.compiler.is_compiling():
        return build(*sources)
    present = [t for t in sources if t is not None]
    for t in present:
        if t.requires_grad:  # a trainable source changes at every step
            return build(*sources)
    # The entry keeps the sources' storage alive (below), so a pointer seen again is the
    # same memory: a new version, or another view of it (shape, strides, dtype), is all
    # that can change what a source holds, short of what bypasses the counter (see
    # above). Every position is signed, an absent source too.
    try:
        sig = [None if t is None else (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype) for t in sources]
    except RuntimeError:  # an inference tensor keeps no version
        return build(*sources)
    first, key = present[0], id(present[0])
    got = _PACKS.get(key)
    if got is None or got[0]() is not first:
        got = _PACKS[key] = (weakref.ref(first, lambda _, key=key, packs=_PACKS: packs.pop(key, None)), {})
    slot = got[1]
    hit = slot.get(kind)
    if hit is not None and hit[0] == sig:
        return hit[1]
    packs = build(*sources)
    # The sources stay referenced (their storage, no copy) so that their memory cannot
    # be taken by another tensor of the same signature while the entry lives.
    slot[kind] = (sig, packs, [t.detach() for t in present])
    return packs


def _build_rows(cd: torch.dtype, *blocks: Optional[Tensor]) -> Tensor:
    """The rows of the blocks present ([M, r, d_in] or [K, d_in]) stacked in order, one
    shrink matrix [rows, d_in]: e.g. [A_cat; W_r], or [A_cat; A_u of all users; W_r]."""
    rows = [t.reshape(-1, t.shape[-1]) for t in blocks if t is not None]
    return _cast(torch.cat(rows) if len(rows) > 1 else rows[0], cd)


def _build_cols(cd: torch.dtype, B: Tensor) -> Tensor:
    """B [M, d_out, r] -> [d_out, M r]: M stacked LoRA up-projections as one matrix."""
    return _cast(B.permute(1, 0, 2).reshape(B.shape[1], -1), cd)


def _build_router(cd: torch.dtype, V: Tensor) -> Tensor:
    """V [N, K, r_u] -> [N r_u, K]: the LoRA-aware router over the rank space of all users."""
    return _cast(V.transpose(1, 2).reshape(-1, V.shape[1]), cd)


