"""Test-suite setup, run before any test module is imported.

* TRITON_INTERPRET=1 on machines without CUDA, so every @triton.jit kernel is
  defined in interpreter mode and its tests run on the CPU. It must be set before
  triton is first imported, hence here.
* PROPER_KERNELS_BACKEND=torch makes ``backend="auto"`` pick the torch backend on the
  CPU, the path a CPU user gets, so tests of the layers, the integration, training and
  the benchmark run it and not the (slow) interpreter; kernel tests ask for
  backend="triton" explicitly, and oracle comparisons call the reference by name.
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
    os.environ.setdefault("PROPER_KERNELS_BACKEND", "torch")


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


@pytest.fixture(scope="session")
def emu():
    """The CPU emulation module of csrc/ (proper_kernels.testing.load_emulator), for the
    tests/test_cuda_*.py modules: skips where it cannot be built, fails under $CI."""
    from proper_kernels.testing import emulator_or_skip

    ext = emulator_or_skip()
    yield ext
    ext.configure()


@pytest.fixture(scope="module")
def triton_interpreter_nested_calls():
    """Nested @triton.jit calls in the Triton CPU interpreter without patching
    triton.language again on every call, for the modules that run kernels there:
    request it with ``pytestmark = pytest.mark.usefixtures("triton_interpreter_nested_calls")``.

    The interpreter (triton 3.x) patches the language modules a function sees (tl,
    tl.core) for a launch and again at every call of a nested jit function (ours, and
    tl.min, tl.zeros, ...), with inspect.getmembers over the whole language: about a
    third of the run time of our kernels, whose user loops call helpers per user. The
    patch of a nested call is never undone before the launch ends, so within a launch
    (a GridExecutor call) a second patch of the same modules changes nothing and is
    skipped; the first one of each set of modules still runs, and outside a launch
    every call patches as before. Where the interpreter's private ``_patch_lang`` or
    ``GridExecutor`` is missing (another triton) nothing changes."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    real = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if real is None or scope_cls is None or grid_call is None:
        yield
        return
    launches = []  # per launch in progress: the sets of language modules patched since it began

    def run_grid(self, *args, **kwargs):
        launches.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_lang(fn):
        key = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if launches and key in launches[-1]:
            return scope_cls()  # in force already; nothing to undo
        if launches:
            launches[-1].add(key)
        return real(fn)

    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = run_grid
    yield
    interpreter._patch_lang = real
    interpreter.GridExecutor.__call__ = grid_call
