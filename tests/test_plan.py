"""The routing plan: segments cover every token exactly once, in a stable order."""
import pytest
import torch

import proper_kernels as pk
from proper_kernels.testing import POPULARITY_LAWS, sample_user_ids

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _check_plan(ids, N):
    p = pk.plan(ids, N)
    T = ids.numel()
    flat = ids.reshape(-1)
    assert p.num_tokens == T and p.num_users == N
    order = p.order.long()
    # A permutation of the tokens ...
    assert sorted(order.tolist()) == list(range(T))
    off = p.seg_offsets.long()
    assert off[0] == 0 and off[-1] == T and bool((off[1:] >= off[:-1]).all())
    # ... where bucket b holds exactly the tokens of user b - 1, in their original order.
    for bkt in range(N + 1):
        seg = order[off[bkt]:off[bkt + 1]]
        assert bool((flat[seg] == bkt - 1).all())
        assert seg.tolist() == sorted(seg.tolist())
    assert p.counts.tolist() == [int((flat == u).sum()) for u in range(N)]
    assert p.active_users.tolist() == sorted(set(flat.tolist()) - {-1})
    assert int(p.num_no_user) == int((flat == -1).sum())
    assert [u for u, _, _ in p.segments()] == p.active_users.tolist()
    return p


@pytest.mark.parametrize("law", POPULARITY_LAWS)
@pytest.mark.parametrize("T,N", [(1, 1), (19, 7), (64, 64), (257, 10), (5, 1000)])
def test_segments_cover_every_token_once(law, T, N):
    g = torch.Generator().manual_seed(T * 7 + N)
    ids = sample_user_ids(T, N, law, generator=g)
    ids[::5] = -1
    _check_plan(ids, N)


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("law", ["distinct", "zipf", "identical"])
def test_tile_table(block_m, law):
    g = torch.Generator().manual_seed(block_m)
    T, N = 53, 9
    ids = sample_user_ids(T, N, law, generator=g)
    ids[::7] = -1
    p = pk.plan(ids, N)
    bucket, start, G = p.tile_table(block_m)
    assert bucket.shape == (G,) and start.shape == (G,)
    off = p.seg_offsets.long()
    covered = []
    for b, s in zip(bucket.tolist(), start.tolist()):
        if b < 0:
            continue
        end = min(s + block_m, int(off[b + 1]))
        assert off[b] <= s < end
        covered.extend(range(s, end))
    assert sorted(covered) == list(range(T))  # every sorted position once
    assert p.tile_table(block_m)[0] is bucket  # cached


def test_empty_and_shapes():
    p = pk.plan(torch.zeros(0, dtype=torch.long), 3)
    assert p.num_tokens == 0 and p.seg_offsets.tolist() == [0, 0, 0, 0, 0]
    assert p.tile_table(16)[2] == 0
    p2 = _check_plan(torch.tensor([[2, 0], [-1, 2]]), 3)
    assert p2.order.tolist() == [2, 1, 0, 3]


def test_bad_ids():
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        pk.plan(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        pk.plan(torch.tensor([-2, 0]), 4)
    with pytest.raises(TypeError, match="integer"):
        pk.plan(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="num_users"):
        pk.plan(torch.tensor([0]), -1)


def test_num_users_type():
    ids = torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match="num_users must be a non-negative int"):
        pk.plan(ids, True)  # a bool is not a bank size
    with pytest.raises(ValueError, match="num_users must be a non-negative int"):
        pk.plan(ids, 4.0)
    p = pk.plan(ids, torch.tensor(4).numpy()[()])  # a numpy integer is an integer
    assert p.num_users == 4 and type(p.num_users) is int


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_unchecked_plan_still_names_out_of_range_ids(bad):
    """check=False skips the range check's host sync on CUDA; on the CPU, where it
    costs none, an id outside [-1, N) still gets a ValueError naming user_ids."""
    with pytest.raises(ValueError, match=r"user_ids must lie in \[-1, 3\)"):
        pk.plan(torch.tensor([0, bad, 1]), 3, check=False)


def test_check_ids_identity_version_and_value():
    """A plan knows the ids it was built from: the same tensor (or a view of the same
    memory and shape) passes without being read, unless modified in place since;
    another tensor passes when its values are equal and raises naming the first token
    that differs."""
    ids = torch.tensor([[2, 0, -1], [1, 2, 2]])
    p = pk.plan(ids, 3)
    p.check_ids(ids)
    p.check_ids(ids.view(2, 3))  # same memory and shape
    p.check_ids(ids.clone())  # equal values
    p.check_ids(ids.reshape(6).int())  # equal values, other shape and dtype
    other = ids.clone()
    other[1, 1] = 0
    with pytest.raises(ValueError, match="plan does not belong to ids_of_batch: token 4 has ids_of_batch 0 but the "
                                         r"plan was built with user 2; rebuild it with pk\.plan"):
        p.check_ids(other, "ids_of_batch")
    with pytest.raises(ValueError, match="plan was built for 6 tokens but user_ids has 5"):
        p.check_ids(torch.zeros(5, dtype=torch.long))
    ids[0, 0] = 2  # same value, but written in place: the plan cannot know without reading
    with pytest.raises(ValueError, match=r"plan was built from user_ids before they were modified in place "
                                         r"\(version 0, now 1\)"):
        p.check_ids(ids)


def test_plans_and_routing_of_inference_tensors():
    """Under torch.inference_mode ids keep no version counter: plans and the layers'
    routing are built all the same, and other ids (or ids changed in place) are told
    by value."""
    from proper_kernels.layers import UserRouting
    from proper_kernels.testing import mixture_case

    c = mixture_case(11, 16, 8, N=4)
    with torch.inference_mode():
        ids = c.user_ids.clone()
        p = pk.plan(ids, 4)
        p.check_ids(ids)
        y = pk.lora_mixture(c.x, c.weight, c.bias, plan=p, **c.kwargs())
        assert torch.allclose(y, pk.lora_mixture(c.x, c.weight, c.bias, **c.kwargs()))
        ids[0] = (ids[0] + 2) % 4
        with pytest.raises(ValueError, match="plan does not belong to user_ids: token 0"):
            p.check_ids(ids)
        rows = torch.tensor([1, 0, -1])
        routing = UserRouting(rows, 4)
        routing.for_input(torch.zeros(3, 5, 2))
        rows[1] = 3
        with pytest.raises(ValueError, match="modified in place after the batch's routing was set"):
            routing.for_input(torch.zeros(3, 5, 2))


@pytest.mark.gpu
def test_unchecked_plan_builds_without_a_host_sync_and_in_a_cuda_graph():
    """check=False on CUDA: no host sync (sync debug mode 'error' would raise), so the
    plan can be rebuilt inside a captured CUDA graph for new ids at every replay."""
    N, T = 9, 50
    ids = torch.randint(-1, N, (T,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = pk.plan(ids, N, check=False)
        p.tile_table(16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = pk.plan(ids.cpu(), N)
    assert torch.equal(p.seg_offsets.cpu(), ref.seg_offsets) and torch.equal(p.order.cpu(), ref.order)
    static = ids.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pk.plan(static, N, check=False)
    new = torch.randint(-1, N, (T,), device="cuda")
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ref = pk.plan(new.cpu(), N)
    assert torch.equal(captured.seg_offsets.cpu(), ref.seg_offsets)
    assert torch.equal(captured.counts.cpu(), ref.counts) and torch.equal(captured.order.cpu(), ref.order)
