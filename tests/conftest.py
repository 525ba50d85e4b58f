"""Test-suite setup, run before any test module is imported.

* TRITON_INTERPRET=1 on machines without CUDA, so every @triton.jit kernel is
  defined in interpreter mode and its tests run on the CPU. It must be set before
  triton is first imported, hence here.
* PROPER_KERNELS_BACKEND=reference makes ``backend="auto"`` pick the reference on
  the CPU, so tests of the module, the integration and the benchmark do not run the
  (slow) interpreter by accident; kernel tests ask for backend="triton" explicitly.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PROPER_KERNELS_BACKEND", "reference")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
