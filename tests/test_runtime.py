"""proper_kernels.runtime: the target GPU's facts, the interpreter check and the tile
schedule of the segment kernels (pure torch, no triton)."""
import pytest
import torch

from proper_kernels.runtime import target
from proper_kernels.runtime.target import max_shared_memory
from proper_kernels.runtime.tiling import segment_chunks


def test_max_shared_memory_table():
    """Opt-in shared memory per block (CUDA programming guide, cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    kb = 1024
    assert max_shared_memory(80) == 163 * kb and max_shared_memory(86) == 99 * kb
    assert max_shared_memory(89) == 99 * kb and max_shared_memory(90) == 227 * kb
    assert max_shared_memory(100) == 227 * kb
    # Consumer / workstation Blackwell (RTX 50xx, RTX PRO 6000): 101376 B, like sm_86 / sm_89.
    assert max_shared_memory(120) == 99 * kb and max_shared_memory(121) == 99 * kb


@pytest.mark.parametrize("triton_v,numpy_v,broken", [
    ((3, 6), (2, 4), True), ((3, 6), (2, 2), False), ((3, 7), (2, 4), False), ((3, 9), (2, 3), False),
    (None, (2, 4), False),
])
def test_interpreter_problem_names_the_fix(monkeypatch, triton_v, numpy_v, broken):
    """Interpreters of triton < 3.7 cannot run with numpy >= 2.3: the reason says so
    and how to fix it (the dispatch then refuses backend='triton', see test_dispatch)."""
    monkeypatch.setattr(target, "_version", lambda dist: {"triton": triton_v, "numpy": numpy_v}[dist])
    target.interpreter_problem.cache_clear()
    try:
        why = target.interpreter_problem()
    finally:
        monkeypatch.undo()
        target.interpreter_problem.cache_clear()
    assert bool(why) is broken
    if broken:
        assert "triton 3.6" in why and "numpy 2.4" in why and "triton >= 3.7 or numpy < 2.3" in why


def test_segment_chunks_table():
    """Chunk boundaries, solo chunks, workspace rows and the host bounds."""
    gen = torch.Generator().manual_seed(3)
    for lengths, chunk in (([31, 32, 33, 0, 63, 64, 65, 1], 32), ([0, 83, 0], 32), ([1], 16), ([0, 0], 16),
                           ([5, 200, 7, 0, 130], 64)):
        seg = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        seg[1:] = torch.tensor(lengths).cumsum(0)
        T = int(seg[-1]) + int(torch.randint(0, 3, (1,), generator=gen))  # T may exceed the users' tokens
        table, ws_off, C, W = segment_chunks(seg, T, chunk)
        assert C == min(T, -(-T // chunk) + len(lengths)) and W == T // chunk + T // (chunk + 1)
        want, rows = [], 0
        for u, n in enumerate(lengths):
            k = -(-n // chunk)
            for i in range(k):
                want.append((u, int(seg[u]) + i * chunk, rows + i if k > 1 else -1))
            assert int(ws_off[u]) == rows
            rows += k if k > 1 else 0
        assert int(ws_off[-1]) == rows <= W
        got = [tuple(c) for c in table.t().tolist() if c[0] >= 0]
        assert got == want and len(want) <= C
        assert (table[:, len(want):] == torch.tensor([[-1], [0], [-1]], dtype=torch.int32)).all()
