"""The GPU generation the Triton launchers choose their launch configs for.

The config tables (:func:`proper_kernels.triton.fwd_config.fwd_config`,
``proper_kernels.triton.bwd_config.bwd_configs``) are keyed on the compute capability
as an int (``major * 10 + minor``: 80 for A100, 90 for H100). :func:`device_arch`
gives it for a launch: the capability of a CUDA tensor's device, else
:data:`DEFAULT_ARCH` (CPU tensors under ``TRITON_INTERPRET=1``, ``meta`` tensors),
unless a :func:`target_arch` block overrides it. The override is how an
ahead-of-time check (``python/aot_check.py --arch 80``) runs the launchers on meta
tensors and sees exactly the configs they would pick on that GPU.

Pure torch (importable without triton).
"""
from __future__ import annotations

import contextlib
import functools
import re
from importlib import metadata
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

__all__ = ["DEFAULT_ARCH", "target_arch", "device_arch", "max_shared_memory", "interpreter_problem"]

# The table the configs were first tuned for (H100); CPU / meta launches get it.
DEFAULT_ARCH = 90

_OVERRIDE: ContextVar[Optional[int]] = ContextVar("proper_kernels_target_arch", default=None)


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[int]:
    """Within the block, every launcher picks configs for compute capability ``arch``
    (e.g. 80, 90) whatever the tensors' device."""
    token = _OVERRIDE.set(int(arch))
    try:
        yield int(arch)
    finally:
        _OVERRIDE.reset(token)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """Compute capability the configs of a launch on ``device`` are chosen for."""
    arch = _OVERRIDE.get()
    if arch is not None:
        return arch
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_ARCH


def max_shared_memory(arch: int) -> int:
    """Opt-in shared memory per block (bytes) of compute capability ``arch``."""
    if arch // 10 == 12:
        return 99 * 1024  # sm_120 / sm_121 (RTX 50xx, RTX PRO 6000, GB10): 101376 B, as sm_86 / sm_89
    if arch >= 90:
        return 227 * 1024  # sm_90 and the sm_100 class
    if arch in (80, 87):
        return 163 * 1024
    if arch >= 86:
        return 99 * 1024  # sm_86, sm_89
    if arch >= 70:
        return 96 * 1024 if arch < 75 else 64 * 1024
    return 48 * 1024


def _version(dist: str):
    try:
        m = re.match(r"(\d+)\.(\d+)", metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """Why the installed triton's CPU interpreter (TRITON_INTERPRET=1) cannot run the
    kernels, or None. Interpreters before triton 3.7 turn one-element arrays into loop
    bounds with int(), which numpy >= 2.3 refuses: every kernel with a loop fails with
    "only 0-dimensional arrays can be converted to Python scalars". Compiled kernels
    (CUDA) are not affected."""
    tv, nv = _version("triton"), _version("numpy")
    if tv is not None and nv is not None and tv < (3, 7) and nv >= (2, 3):
        return (f"the CPU interpreter of triton {tv[0]}.{tv[1]} fails with numpy {nv[0]}.{nv[1]} "
                "(int() of one-element arrays): install triton >= 3.7 or numpy < 2.3")
    return None
