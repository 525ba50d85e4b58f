"""The paged user bank (proper_kernels.integrations.paged, ProperConfig(user_bank="paged")):
on a tiny random Llama with N = 2,000 users and C = 8 device slots it computes what
the resident bank computes (logits, greedy generation, training steps with users that
change every batch and trained users that are evicted and come back), its device
memory does not grow with N, it saves, loads, maps, grows and exports without a second
copy of the bank, and it refuses what it cannot do with errors that say why. Also the
bank files (proper_kernels.integrations.bank_io) and their checks. CPU."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from proper_kernels.integrations.bank_io import BankFileError, SafetensorsFile, write_safetensors  # noqa: E402
from proper_kernels.integrations.persistence import WEIGHTS_NAME  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    random_token_seqs, randomize_adapters, tiny_causal_lm, tiny_proper_config)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N, C = 2000, 8
# Six users a batch, C = 8: batch 1 evicts four users of batch 0, and batch 2 brings
# three of them (trained at step 0) back; -1 rows have no user.
BATCHES = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [0, 1, 2, 12, 1999, -1]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(an untouched tiny Llama, the directory of a resident model with N users in the
    user stage, every adapter random)."""
    orig = tiny_causal_lm()
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(num_users=N))
    for seed, stage in enumerate(("population", "group", "user"), start=1):
        pm.set_stage(stage)
        randomize_adapters(pm, seed=seed)
    d = tmp_path_factory.mktemp("resident")
    pm.save_pretrained(d)
    return orig, d


def _load(saved, **bank):
    orig, d = saved
    return ProperModel.from_pretrained(copy.deepcopy(orig), d, **bank)


def _paged(saved, **kw):
    return _load(saved, user_bank="paged", user_cache_size=C, **kw)


def _batch(i, users):
    return torch.tensor(random_token_seqs([7] * len(users), seed=i))


def _train(pm, batches, **opt):
    """One make_optimizer step per batch; the losses."""
    opt = pm.make_optimizer(lr=1e-2, weight_decay=0.1, **opt)
    pm.train()
    losses = []
    for i, users in enumerate(batches):
        ids = _batch(i, users)
        loss = pm(input_ids=ids, labels=ids, user_ids=users).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    pm.eval()
    return losses


def _same_state(a, b):
    assert list(a) == list(b)  # the same keys in the same order, whatever the bank
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# ---------------------------------------------------------------------- paged == resident
def test_paged_equals_resident_logits_generation_and_training(saved):
    res, pag = _load(saved), _paged(saved)
    assert pag.user_bank.mode == "paged" and pag.num_users == N
    ids = _batch(7, [0] * 4)
    users = [3, 1999, -1, 3]
    with torch.no_grad():
        assert torch.equal(res(input_ids=ids, user_ids=users).logits, pag(input_ids=ids, user_ids=users).logits)

    lr, lp = _train(res, BATCHES), _train(pag, BATCHES)
    for a, b in zip(lr, lp):
        assert torch.equal(a, b)
    bank = pag.user_bank
    assert bank.stats["evictions"] >= 4 and bank.stats["bytes_to_host"] > 0  # trained rows went home
    assert {0, 1, 2} <= set(bank.resident_users())  # evicted at batch 1, back at batch 2
    touched = sorted({u for b in BATCHES for u in b if u >= 0})
    _same_state(res.get_user_state(touched + [77]), pag.get_user_state(touched + [77]))

    # after training: logits and greedy generation with users in and out of the cache
    prompt = _batch(8, [0] * 4)[:, :5]
    gen_users = [6, 0, 1999, -1]
    with torch.no_grad():
        assert torch.equal(res(input_ids=prompt, user_ids=gen_users).logits,
                           pag(input_ids=prompt, user_ids=gen_users).logits)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(res.generate(input_ids=prompt, user_ids=gen_users, **kw),
                       pag.generate(input_ids=prompt, user_ids=gen_users, **kw))


def test_device_memory_does_not_grow_with_the_number_of_users(saved):
    pag = _paged(saved)
    orig, _ = saved
    small = get_proper_model(copy.deepcopy(orig), tiny_proper_config(num_users=20, user_bank="paged",
                                                                     user_cache_size=C))
    for stage in ("population", "group", "user"):  # merges the population LoRA, as in the saved model
        small.set_stage(stage)
    count = lambda pm: sum(p.numel() for p in pm.parameters())  # noqa: E731
    assert count(pag) == count(small)
    for _, p in pag.user_bank.tensors():
        assert p.shape[0] == C
    assert pag.num_users == N and small.num_users == 20
    _train(pag, BATCHES)
    _train(small, [[u % 20 if u >= 0 else u for u in b] for b in BATCHES])
    # slots, their gradients and their optimiser state: the same for 20 users as for 2,000
    assert pag.user_bank.device_bytes() == small.user_bank.device_bytes()
    assert pag.user_bank.host_bytes() > 10 * small.user_bank.host_bytes()  # the host bank is O(N)


# ---------------------------------------------------------------------- errors
def test_clear_errors_for_too_many_users_and_unknown_ids(saved):
    pag = _paged(saved)
    ids = _batch(0, [0] * 9)
    with torch.no_grad(), pytest.raises(ValueError, match=r"9 distinct users .*user_cache_size=8"):
        pag(input_ids=ids, user_ids=list(range(9)))
    with torch.no_grad(), pytest.raises(ValueError, match=r"unknown user id\(s\) \[2000\]"):
        pag(input_ids=ids[:2], user_ids=[2000, 1])
    # gradients of earlier batches hold their users' slots until the optimiser steps
    pag.train()
    pag(input_ids=ids[:6], labels=ids[:6], user_ids=list(range(6))).loss.backward()
    with pytest.raises(ValueError, match=r"wait for the optimiser step.*make_optimizer"):
        pag(input_ids=ids[:6], labels=ids[:6], user_ids=list(range(6, 12)))
    opt = pag.make_optimizer(lr=1e-3)
    opt.step()
    pag(input_ids=ids[:6], labels=ids[:6], user_ids=list(range(6, 12)))  # released by the step


def test_data_parallel_training_without_sharding_is_refused(saved, monkeypatch):
    """Under a process group of more than one rank, a paged bank that is not sharded
    holds other users on each rank: training it would mix their gradients, so it
    raises; inference, and a bank sharded by pm.shard_users, run."""
    from proper_kernels.integrations import paged

    monkeypatch.setattr(paged, "data_parallel_world", lambda: 2)
    pag = _paged(saved)
    ids = _batch(0, [0] * 2)
    with torch.no_grad():
        pag(input_ids=ids, user_ids=[0, 1])
    pag.train()
    with pytest.raises(RuntimeError, match=r"needs pm.shard_users\(rank, world_size\)"):
        pag(input_ids=ids, labels=ids, user_ids=[0, 1])
    pag.shard_users(rank=0, world_size=2)
    pag(input_ids=ids, labels=ids, user_ids=[0, 2]).loss.backward()


def test_corrupt_or_partial_bank_files_raise_naming_the_file(saved, tmp_path):
    orig, d = saved
    raw = (d / WEIGHTS_NAME).read_bytes()
    for name, data, match in [("cut", raw[:-100], "truncated"), ("junk", b"\xff" * 64, "header length"),
                              ("json", raw[:8] + b"#" + raw[9:], "corrupt safetensors header")]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "proper_config.json").write_bytes((d / "proper_config.json").read_bytes())
        (bad / WEIGHTS_NAME).write_bytes(data)
        with pytest.raises(ValueError, match=match) as e:
            ProperModel.from_pretrained(copy.deepcopy(orig), bad, user_bank="paged", user_cache_size=C)
        assert str(bad) in str(e.value)
    f = SafetensorsFile(d / WEIGHTS_NAME)
    keys = f.keys()
    user_key = next(k for k in keys if k.endswith(".user_A"))
    for name, entries, match in [
        ("missing", [(k, *f.entries[k][:2], [f.tensor(k)]) for k in keys if k != user_key], "missing tensor"),
        ("rows", [(k, *f.entries[k][:2], [f.tensor(k)]) if k != user_key else
                  (k, f.entries[k][0], (N - 1,) + f.entries[k][1][1:], [f.tensor(k)[:-1]]) for k in keys],
         r"saved shape \[1999"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "proper_config.json").write_bytes((d / "proper_config.json").read_bytes())
        write_safetensors(str(bad / WEIGHTS_NAME), entries)
        with pytest.raises(ValueError, match=match):
            ProperModel.from_pretrained(copy.deepcopy(orig), bad, user_bank="paged", user_cache_size=C)


# ---------------------------------------------------------------------- persistence and per-user state
def test_save_load_map_and_subsets_in_paged_mode(saved, tmp_path):
    orig, _ = saved
    pag = _paged(saved)
    _train(pag, BATCHES)  # trained rows partly in slots, partly written back
    pag.save_pretrained(tmp_path / "full")
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "full" / WEIGHTS_NAME)
    every = pag.get_user_state(list(range(N)))
    for k, v in every.items():
        assert torch.equal(on_disk[k], v)
    ids = _batch(3, [0] * 3)
    users = [0, 1999, 11]
    with torch.no_grad():
        want = pag(input_ids=ids, user_ids=users).logits
        for bank in (dict(user_bank="resident"), dict(user_bank="paged", user_cache_size=4),
                     dict(user_bank="paged", user_cache_size=4, mmap=True)):
            pm = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full", **bank)
            assert torch.equal(pm(input_ids=ids, user_ids=users).logits, want), bank

    # a mapped bank trains in memory: the file it maps never changes, a save beside it is new
    mapped = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full", mmap=True)
    before = (tmp_path / "full" / WEIGHTS_NAME).read_bytes()
    _train(mapped, BATCHES[:1])
    mapped.sync_users()
    assert (tmp_path / "full" / WEIGHTS_NAME).read_bytes() == before
    mapped.save_pretrained(tmp_path / "full")  # over the file it maps: written aside, then renamed
    assert torch.equal(load_file(tmp_path / "full" / WEIGHTS_NAME)[next(iter(every))][:6],
                       mapped.get_user_state(list(range(6)))[next(iter(every))])

    # a user subset, into a resident and into a paged model
    pag.save_pretrained(tmp_path / "sub", users=[1999, 0])
    res = _load(saved)
    res.load_users(tmp_path / "sub", at=[5, 6])
    other = _paged(saved)
    other.load_users(tmp_path / "sub", at=[5, 6])
    _same_state(res.get_user_state([5, 6]), other.get_user_state([5, 6]))
    _same_state(other.get_user_state([5, 6]), pag.get_user_state([1999, 0]))


def test_add_users_appends_without_copying_and_state_round_trips(saved, tmp_path):
    pag = _paged(saved)
    store = pag.user_bank._rows[0]
    first = store.chunks[0]
    ptr = first.data_ptr()
    new = pag.add_users(3)
    assert new == [N, N + 1, N + 2] and pag.num_users == N + 3
    assert store.chunks[0] is first and first.data_ptr() == ptr  # the existing bank was not copied
    with torch.no_grad():
        pag(input_ids=_batch(0, [0, 0]), user_ids=[N + 2, 4])
    state = pag.get_user_state([N + 2])
    assert all(not v.abs().sum() for k, v in state.items() if k.endswith(("user_B", "user_router")))

    # set/get through slots and host rows; the PEFT export reads the same rows as a resident model
    res = _load(saved)
    res.add_users(3)
    src = res.get_user_state([1, 2])
    for pm in (pag, res):
        pm.set_user_state(src, [4, N + 1])  # user 4 is in a slot, N + 1 only in host memory
    _same_state(pag.get_user_state([4, N + 1]), res.get_user_state([4, N + 1]))
    with torch.no_grad():
        assert torch.equal(pag(input_ids=_batch(1, [0, 0]), user_ids=[4, N + 1]).logits,
                           res(input_ids=_batch(1, [0, 0]), user_ids=[4, N + 1]).logits)
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    pag.export_peft_user(tmp_path / "p", 4)
    res.export_peft_user(tmp_path / "r", 4)
    _same_state(*(load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "r")))


def test_frozen_users_do_not_move_and_survive_eviction(saved):
    pag = _paged(saved)
    pag.freeze_users([1, 7])
    pinned = pag.get_user_state([1, 7])
    _train(pag, BATCHES)  # 1 is evicted and comes back; 7 is in batch 1
    pag.restore_frozen_users()
    _same_state(pag.get_user_state([1, 7]), pinned)
    pag.set_user_state(pag.get_user_state([0, 3]), [1, 7])  # a write to frozen users: undone by the restore
    pag.restore_frozen_users()
    _same_state(pag.get_user_state([1, 7]), pinned)
    moved = pag.get_user_state([0])
    assert any(not torch.equal(moved[k], v) for k, v in _load(saved).get_user_state([0]).items())


# ---------------------------------------------------------------------- bank files
def test_bank_files_are_safetensors_files_both_ways(tmp_path):
    from safetensors.torch import load_file, save_file

    a, b = torch.randn(5, 3), torch.arange(7, dtype=torch.bfloat16)
    write_safetensors(str(tmp_path / "w.st"), [("a", torch.float32, (5, 3), [a[:2], a[2:]]),
                                               ("b", torch.bfloat16, (7,), [b])], {"format": "x"})
    got = load_file(tmp_path / "w.st")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    save_file({"x": a, "y": b.clone()}, tmp_path / "s.st")
    f = SafetensorsFile(tmp_path / "s.st")
    assert torch.equal(f.tensor("x"), a) and torch.equal(f.tensor("y"), b)
    f.tensor("x").zero_()  # copy-on-write: the file keeps its bytes
    assert torch.equal(load_file(tmp_path / "s.st")["x"], a)
    with pytest.raises(ValueError, match="rows"):
        write_safetensors(str(tmp_path / "bad.st"), [("a", torch.float32, (6, 3), [a])])
    assert not os.path.exists(tmp_path / "bad.st") and not os.path.exists(tmp_path / "bad.st.tmp")
    with pytest.raises(BankFileError, match="too short"):
        (tmp_path / "e.st").write_bytes(b"")
        SafetensorsFile(tmp_path / "e.st")


def test_per_user_early_stopping_runs_on_a_paged_bank(saved):
    from proper_kernels.train.early_stopping import PerUserEarlyStopping

    pag = _paged(saved)
    start = pag.get_user_state([0, 1, 5])
    es = PerUserEarlyStopping(pag, [0, 1, 2], patience=1)
    es.start({0: 1.0, 1: 1.0, 2: 1.0})  # every user without validation data is frozen
    assert len(pag.frozen_users) == N - 3
    _train(pag, [[0, 1, 2, 5]])  # user 5 is frozen: it does not move
    trained = pag.get_user_state([0])
    assert es.update(1, {0: 0.5, 1: 2.0, 2: 2.0}) == [1, 2]  # 0 improved; 1 and 2 stop at their start rows
    es.finish()
    now = pag.get_user_state([0, 1, 5])
    for k, v in now.items():
        assert torch.equal(v[0], trained[k][0]) and torch.equal(v[1:], start[k][1:]), k
    assert not torch.equal(trained[k][0], start[k][0])
