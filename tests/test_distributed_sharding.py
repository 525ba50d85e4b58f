"""Users sharded by rank, in one process (no process group): ``shard_users``, the
``UserShardSampler``, sharded checkpoints read at other world sizes, and the parts of
the global balance loss. The multi-process runs are in test_distributed.py."""
import pytest
import torch

from proper_kernels.integrations import ProperModel
from proper_kernels.integrations.distributed import (UserShardSampler, decoder_layers, global_importance,
                                                     user_parameter_names)
from proper_kernels.reference.losses import balance_from_importance, balance_loss, gate_importance
from proper_kernels.testing import tiny_causal_lm, trained_proper_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N = 7


def _rows(pm, users):
    """Every banked tensor's rows of ``users``, flattened into one vector per user."""
    state = pm.get_user_state(users)
    return torch.cat([v.reshape(len(users), -1) for _, v in sorted(state.items())], 1)


def test_a_rank_holds_its_users_and_takes_global_ids():
    full, _ = trained_proper_model(num_users=N)
    pm, _ = trained_proper_model(num_users=N)  # the same model (seeded)
    pm.shard_users(rank=1, world_size=3)  # users 1 and 4
    assert pm.num_users == N
    for _, layer in pm.adapted_layers():
        assert layer.user_A.shape[0] == 2 and layer.num_users == 2
    assert torch.equal(_rows(pm, [1, 4]), _rows(full, [1, 4]))
    with pytest.raises(ValueError, match=r"user 2 \(owner: rank 2\), user 3 \(owner: rank 0\) not on rank 1 of 3"):
        pm.get_user_state([2, 3, 4])
    ids = torch.randint(3, 97, (4, 6), generator=torch.Generator().manual_seed(0))
    users = torch.tensor([4, 1, -1, 4])
    assert torch.equal(pm(input_ids=ids, user_ids=users).logits, full(input_ids=ids, user_ids=users).logits)
    with pytest.raises(ValueError, match=r"user 0 \(owner: rank 0\) not on rank 1 of 3"):
        pm(input_ids=ids, user_ids=torch.tensor([4, 1, 0, 4]))
    # DDP skips the rows; a second sharding, or more ranks than users, is refused
    names = set(user_parameter_names(pm))
    assert set(pm._ddp_params_and_buffers_to_ignore) == names and len(names) == 4 * len(pm.layer_names)
    with pytest.raises(RuntimeError, match="already sharded"):
        pm.shard_users(rank=0, world_size=3)
    small, _ = trained_proper_model(num_users=2)
    with pytest.raises(ValueError, match="at least world_size users"):
        small.shard_users(rank=0, world_size=3)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        full.shard_users(rank=3, world_size=3)


def test_new_users_go_to_their_owner():
    pm, _ = trained_proper_model(num_users=N)
    pm.shard_users(rank=1, world_size=3)
    assert pm.add_users(4) == [7, 8, 9, 10]  # rank 1 owns 7 and 10
    assert pm.num_users == 11
    for _, layer in pm.adapted_layers():
        assert layer.user_A.shape[0] == 4
    pm.set_user_state(pm.get_user_state([10]), [10])
    with pytest.raises(ValueError, match=r"user 8 \(owner: rank 2\)"):
        pm.get_user_state([8])


def test_frozen_users_and_names_follow_their_rank():
    pm, _ = trained_proper_model(num_users=N)
    pm.freeze_users([1, 2, 4])
    pm.user_bank.set_names({"ann": 4, "bob": 2})
    pinned = _rows(pm, [1, 4])
    pm.shard_users(rank=1, world_size=3)
    assert pm.frozen_users == [1, 4]  # user 2 is rank 2's
    assert pm.user_rows == {"ann": 4, "bob": 2}
    with torch.no_grad():
        for _, p in pm.user_bank.tensors():
            p.add_(1.0)
    pm.restore_frozen_users()
    assert torch.equal(_rows(pm, [1, 4]), pinned)
    pm.unfreeze_users([2, 4])
    assert pm.frozen_users == [1]


@pytest.mark.parametrize("bank", ["resident", "paged"])
def test_user_stage_of_a_sharded_run_follows_the_union_batch(tmp_path, bank):
    """The user stage (no collective: nothing shared trains, no auxiliary loss), rank
    by rank in one process: with the lazy per-user AdamW every rank's rows follow one
    process on the union batch, resident or paged; the ranks' save reloads whole."""
    src, _ = trained_proper_model(num_users=6)
    src.save_pretrained(str(tmp_path / "start"))

    def load(mode):
        kw = dict(user_bank="paged", user_cache_size=3) if mode == "paged" else {}
        return ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "start"), **kw).train()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (8, 6), generator=g)
    users = torch.tensor([0, 2, 4, 0, 1, 3, 5, 5])  # 4 rows per rank

    def train(pm, rows):
        opt = pm.make_optimizer(lr=1e-2, eps=1e-6)
        for _ in range(2):
            out = pm(input_ids=ids[rows], labels=ids[rows], user_ids=users[rows])
            opt.zero_grad()
            out.loss.backward()
            opt.step()

    whole = load("resident")
    train(whole, slice(None))
    for r in (1, 0):  # rank 0 saves last: it writes the config
        pm = load(bank)
        pm.shard_users(rank=r, world_size=2)
        train(pm, users % 2 == r)
        mine = [0, 2, 4] if r == 0 else [1, 3, 5]
        torch.testing.assert_close(_rows(pm, mine), _rows(whole, mine), rtol=0, atol=1e-6)
        pm.save_pretrained(str(tmp_path / "trained"))
    back = ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "trained"))
    torch.testing.assert_close(_rows(back, list(range(6))), _rows(whole, list(range(6))), rtol=0, atol=1e-6)


def _save_sharded(pm_factory, directory, world: int):
    """Save as ``world`` ranks would, in one process: each rank its users; rank 0 last
    (it writes the config listing every shard file)."""
    for r in reversed(range(world)):
        pm = pm_factory()
        pm.shard_users(rank=r, world_size=world)
        pm.save_pretrained(str(directory))


def _prepared():
    pm, _ = trained_proper_model(num_users=N)
    pm.freeze_users([0, 5])
    pm.user_bank.set_names({"ann": 5, 3: 3})
    return pm


def test_sharded_checkpoint_reads_at_any_world_size(tmp_path):
    whole_pm = _prepared()
    _save_sharded(_prepared, tmp_path, world=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "proper_users-00000-of-00002.safetensors" in files and "proper_users-00001-of-00002.safetensors" in files
    one = ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path))
    assert one.num_users == N and one.frozen_users == [0, 5] and one.user_rows == {"ann": 5, 3: 3}
    want = whole_pm.adapter_state_dict()
    got = one.adapter_state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for r in range(3):
        part = ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path), rank=r, world_size=3)
        mine = list(range(r, N, 3))
        assert part.num_users == N
        assert torch.equal(_rows(part, mine), _rows(whole_pm, mine))
        assert part.frozen_users == [u for u in (0, 5) if u % 3 == r]
        assert part.user_rows == {"ann": 5, 3: 3}
        for key, t in part.adapter_state_dict().items():
            if not key.rsplit(".", 1)[-1].startswith(("user_embedding", "user_A", "user_B", "user_router")):
                assert torch.equal(t, want[key]), key


def test_full_checkpoint_reads_as_one_rank_of_many(tmp_path):
    pm = _prepared()
    pm.save_pretrained(str(tmp_path))
    part = ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path), rank=2, world_size=3)
    assert torch.equal(_rows(part, [2, 5]), _rows(pm, [2, 5]))
    assert part.frozen_users == [5]
    with pytest.raises(ValueError, match="rank and world_size together"):
        ProperModel.from_pretrained(tiny_causal_lm(), str(tmp_path), rank=1)


def test_user_shard_sampler_sends_users_to_their_owner_and_balances():
    users = [0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 3, -1, -1, -1, -1, 6, 1]
    W, bs = 3, 2
    samplers = [UserShardSampler(users, bs, rank=r, world_size=W, seed=5) for r in range(W)]
    assert len({len(s) for s in samplers}) == 1
    seen = []
    for r, s in enumerate(samplers):
        rows = s.rank_rows(r)
        assert all(users[i] == -1 or users[i] % W == r for i in rows)
        batches = list(s)
        assert batches == s.rank_batches(r) and all(len(b) == bs for b in batches)
        seen += rows
    assert sorted(seen) == list(range(len(users)))  # every row once, before padding
    # owned rows 9, 3, 2; the 4 rows without a user go to the emptiest rank, one at a time
    assert [len(s.rank_rows(r)) for r, s in enumerate(samplers)] == [9, 5, 4]
    assert len(samplers[0]) == 5  # ceil(9 / 2): the other ranks repeat rows to keep up
    again = UserShardSampler(users, bs, rank=1, world_size=W, seed=5)
    assert list(again) == list(samplers[1])
    again.set_epoch(1)
    assert list(again) != list(samplers[1])
    drop = UserShardSampler(users, bs, rank=0, world_size=W, drop_last=True)
    assert len(drop) == 2 and len({i for b in drop for i in b}) == 4
    with pytest.raises(ValueError, match=r"ranks \[2\] of 3 get no rows"):
        UserShardSampler([0, 1, 3, 4], 1, rank=0, world_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        UserShardSampler(users, 0, rank=0, world_size=3)


def test_balance_of_summed_gate_masses_is_the_concatenated_batch_s():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(5, 7, 4, generator=g), -1)
    b = torch.softmax(torch.randn(3, 7, 4, generator=g), -1)
    ma, mb = torch.rand(5, 7, generator=g) > 0.3, torch.rand(3, 7, generator=g) > 0.3
    parts = balance_from_importance(gate_importance(a, ma) + gate_importance(b, mb))
    whole = balance_loss(torch.cat([a, b]), torch.cat([ma, mb]))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="importance must be"):
        balance_from_importance(a)
    pm, _ = trained_proper_model()
    masses = [gate_importance(a), gate_importance(b)]
    assert global_importance(pm, masses) is masses  # no process group: this batch alone


def test_diversity_loss_is_formed_in_forward_in_the_group_stage():
    pm, _ = trained_proper_model()
    pm.set_stage("group").train()
    ids = torch.randint(3, 97, (2, 5))
    out = pm(input_ids=ids, labels=ids, user_ids=[0, 1])
    for _, layer in pm.adapted_layers():
        assert layer.track_diversity and layer.last_diversity is not None
        torch.testing.assert_close(layer.last_diversity, layer.diversity_loss(), rtol=0, atol=0)
    assert out.loss.requires_grad
    pm.set_stage("user")  # no auxiliary loss (aux_in_user_stage off): nothing formed
    pm(input_ids=ids, labels=ids, user_ids=[0, 1])
    assert all(not layer.track_diversity and layer.last_diversity is None for _, layer in pm.adapted_layers())
    assert len(decoder_layers(pm)) == 2
