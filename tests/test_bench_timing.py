"""benchmarks/timing.py: how a step is timed (GPU: do_bench with L2 flushed, CUDA
graphs for tiny decode; CPU: wall-clock quantiles), run untimed, and profiled."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import timing  # noqa: E402
from presets import build_cases  # noqa: E402

CPU = torch.device("cpu")


def _case(op, T=None):
    return [c for c in build_cases("cpu-small", [op], None) if T is None or c.T == T][0]


def test_gpu_decode_graph_timing_flushes_l2(monkeypatch):
    """Decode cases timed under CUDA graphs must see a cold L2 like every do_bench row:
    one call captured in a graph, each replay timed by do_bench (which flushes L2
    before each call), not do_bench_cudagraph (back-to-back replays, no flush: W0 of
    a 4096x4096 projection stays in an H100's 50 MB L2 and the roofline % tops 100)."""
    pytest.importorskip("triton")
    import triton.testing as tt

    calls = []

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    def fake_do_bench(fn, warmup=25, rep=100, quantiles=None, **kw):
        calls.append(("do_bench", fn))
        fn()
        return [1.0, 0.9, 1.1]

    def no_graph_bench(*a, **k):
        raise AssertionError("do_bench_cudagraph does not flush L2 between calls")

    graph = FakeGraph()
    monkeypatch.setattr(timing, "capture_graph", lambda fn: graph)
    monkeypatch.setattr(tt, "do_bench", fake_do_bench)
    monkeypatch.setattr(tt, "do_bench_cudagraph", no_graph_bench)
    case = _case("decode", T=16)
    med, p20, p80, timer = timing.time_fn(lambda: None, torch.device("cuda"), case, 10.0, graph_safe=True)
    assert (med, p20, p80, timer) == (1.0, 0.9, 1.1, "cudagraph")
    assert calls[0][0] == "do_bench" and calls[0][1] == graph.replay and calls[1] == "replay"

    # capture fails (host syncs): plain do_bench of the step, timer "do_bench"
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timing, "capture_graph", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    step = lambda: None  # noqa: E731
    calls.clear()
    assert timing.time_fn(step, torch.device("cuda"), case, 10.0, graph_safe=True)[3] == "do_bench"
    assert calls[0] == ("do_bench", step)
    # a step with host syncs is never captured
    monkeypatch.setattr(timing, "capture_graph", lambda fn: pytest.fail("captured a graph-unsafe step"))
    calls.clear()
    assert timing.time_fn(step, torch.device("cuda"), case, 10.0, graph_safe=False)[3] == "do_bench"


def test_cpu_wall_clock_quantiles():
    n = []
    med, p20, p80, timer = timing.time_fn(lambda: n.append(1), CPU, _case("decode", T=1), 2.0)
    assert timer == "wall" and 0 <= p20 <= med <= p80
    assert len(n) >= 3 + 1  # a warmup and at least three timed calls


def test_e2e_steps_are_few():
    """Whole model steps: one warmup, then 1 to 5 timed steps within the budget."""
    n = []
    timing.time_fn(lambda: n.append(1), CPU, _case("e2e"), 1.0)
    assert 2 <= len(n) <= 6


def test_quantiles_and_untimed_runs():
    assert timing.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx([3.0, 1.8, 4.2])
    n = []
    assert timing.run_untimed(lambda: n.append(1), "bench::x", CPU, 3) == "ran 3 untimed"
    assert len(n) == 3


def test_profile_writes_a_trace(tmp_path, capsys):
    timing.profile_case(lambda: torch.ones(4) @ torch.ones(4), CPU, "bench::decode::torch::case3/x", str(tmp_path))
    (trace,) = list(tmp_path.iterdir())
    assert trace.name == "bench__decode__torch__case3_x.json" and trace.stat().st_size > 0
    assert "[profile] bench::decode::torch::case3/x" in capsys.readouterr().out
