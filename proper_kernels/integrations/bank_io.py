"""safetensors files written a block at a time and read through a memory map.

A user bank can be larger than what one ``safetensors.torch.save_file`` call should
hold in memory (it needs every tensor whole and contiguous) and larger than host
memory itself. Here:

* :func:`write_safetensors` streams each tensor as a sequence of row blocks (the
  chunks of a paged bank, one at a time), into a temporary file renamed over the
  target at the end, so a reader that maps the old file keeps its pages and a crash
  leaves the old file whole.
* :class:`SafetensorsFile` validates a file (header size, JSON, dtypes, shapes, the
  offsets of every tensor against its size and against the file's length) and hands
  out tensors that are views of a copy-on-write map of it: nothing is read until a
  page is touched, and writing to a view never changes the file.

The format is the safetensors one (8-byte little-endian header length, JSON header
``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`` padded to 8
bytes, then the data, every byte of it owned by one tensor), so
``safetensors.torch.load_file`` reads what is written here and the other way round.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["SafetensorsFile", "write_safetensors", "BankFileError", "DTYPES"]

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class BankFileError(ValueError):
    """A safetensors file that is not one, is truncated, or is inconsistent."""


# An entry to write: (name, dtype, shape, blocks); the blocks, concatenated along dim 0,
# are the tensor (one block for a plain tensor; a bank's chunks for its rows). Blocks
# None: the tensor is all zeros, left as a hole of a sparse file (no disk written).
Entry = Tuple[str, torch.dtype, Sequence[int], Optional[Iterable[Tensor]]]


def write_safetensors(path: str, entries: Sequence[Entry], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``entries`` to ``path`` in the safetensors format, a block at a time, in
    the order given (so tensors written one after another lie one after another in
    the file). Every block must have the entry's dtype and row shape; their rows must
    add up to shape[0]; an entry without blocks (None) is zeros, a hole in the file.
    Written to ``path + ".tmp"`` and renamed over ``path``."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape, _ in entries:
        if dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {dtype} cannot be written to safetensors")
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp"
    try:
        _write_data(tmp, raw, header, entries, off)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _write_data(tmp: str, raw: bytes, header: dict, entries: Sequence[Entry], size: int) -> None:
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, blocks in entries:
            if blocks is None:
                f.seek(header[name]["data_offsets"][1] - header[name]["data_offsets"][0], os.SEEK_CUR)
                continue
            rows, row_shape = 0, tuple(shape[1:])
            for b in blocks:
                if b.dtype != dtype or tuple(b.shape[1:]) != row_shape:
                    raise ValueError(f"{name}: a block of dtype {b.dtype} shape {list(b.shape)} in an entry of "
                                     f"dtype {dtype} rows {list(row_shape)}")
                rows += b.shape[0]
                if b.numel():
                    f.write(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if rows != (shape[0] if len(shape) else 1):
                raise ValueError(f"{name}: blocks hold {rows} rows, the entry says {shape[0] if shape else 1}")
        f.truncate(8 + len(raw) + size)  # a trailing hole still has its length


class SafetensorsFile:
    """A validated safetensors file, mapped copy-on-write.

    Raises :class:`BankFileError` naming the file for anything that is not a whole,
    consistent safetensors file (too short, a header that is not JSON or runs past the
    end, an unknown dtype, offsets that do not match the shape or leave holes, data
    cut short)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise BankFileError(f"{self.path}: {size} bytes is too short for a safetensors file (truncated?)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise BankFileError(f"{self.path}: header length {n} does not fit the file's {size} bytes "
                                    f"(not a safetensors file, or truncated)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BankFileError(f"{self.path}: corrupt safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise BankFileError(f"{self.path}: corrupt safetensors header (not a JSON object)")
            self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
            self._data = 8 + n
            self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
            for name, e in header.items():
                self.entries[name] = self._check_entry(name, e)
            spans = sorted((b, e) for _, _, b, e in self.entries.values())
            end = 0
            for b, e in spans:
                if b != end:
                    raise BankFileError(f"{self.path}: tensor data overlaps or leaves a hole at byte {end}")
                end = e
            if self._data + end > size:
                raise BankFileError(f"{self.path}: truncated: the header describes {self._data + end} bytes, the file "
                                    f"has {size}")
            if self._data + end < size:
                raise BankFileError(f"{self.path}: {size - self._data - end} bytes after the last tensor")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > self._data else None

    def _check_entry(self, name: str, e) -> Tuple[torch.dtype, Tuple[int, ...], int, int]:
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BankFileError(f"{self.path}: corrupt header entry {name!r}: {e!r}") from None
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != want:
            raise BankFileError(f"{self.path}: {name}: shape {list(shape)} of {e['dtype']} needs {want} bytes, the "
                                f"offsets give {end - begin}")
        return dtype, shape, begin, end

    def keys(self) -> List[str]:
        return list(self.entries)

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``: a view of the map (writes stay in memory, never in the file)."""
        dtype, shape, begin, end = self.entries[name]
        return self._view(dtype, shape, begin, end)

    def span(self, names: Sequence[str]) -> Optional[Tensor]:
        """The tensors ``names`` (same dtype and shape, stored one after another in this
        order) as one view [len(names), *shape] of the map, or None where they are not."""
        first = self.entries[names[0]]
        for a, b in zip(names, names[1:]):
            ea, eb = self.entries[a], self.entries[b]
            if eb[0] != first[0] or eb[1] != first[1] or eb[2] != ea[3]:
                return None
        return self._view(first[0], (len(names),) + first[1], first[2], self.entries[names[-1]][3])

    def _view(self, dtype, shape, begin, end) -> Tensor:
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data + begin).view(shape)
