"""Test-suite setup, run before any test module is imported.

* TRITON_INTERPRET=1 on machines without CUDA, so every @triton.jit kernel is
  defined in interpreter mode and its tests run on the CPU. It must be set before
  triton is first imported, hence here.
* PROPER_KERNELS_BACKEND=reference makes ``backend="auto"`` pick the reference on
  the CPU, so tests of the module, the integration and the benchmark do not run the
  (slow) interpreter by accident; kernel tests ask for backend="triton" explicitly.
* Modules that run kernels in the interpreter call :func:`skip_if_interpreter_broken`:
  an interpreter that cannot run at all (triton < 3.7 with numpy >= 2.3) skips them
  with the fix in the reason instead of failing every test.
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


def skip_if_interpreter_broken():
    """Skip the calling test module when its kernels run in the interpreter
    (TRITON_INTERPRET=1, also in a GPU machine's subprocess rerun) and that cannot run
    them (see proper_kernels.runtime.target.interpreter_problem)."""
    from proper_kernels.runtime.target import interpreter_problem

    why = interpreter_problem() if os.environ.get("TRITON_INTERPRET") == "1" else None
    if why:
        pytest.skip(why, allow_module_level=True)


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


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a test module (tiny models run fastest so and leave the
    other cores alone); request it with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
