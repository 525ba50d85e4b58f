"""The user bank of ProperModel (proper_kernels.integrations.user_bank): growing it,
per-user state get/set (all or nothing), rows of another rank and scale fitted to the
bank, user names, and freezing users for per-user early stopping, on a tiny random
Llama (CPU)."""
import pytest
import torch

pytest.importorskip("transformers")

from proper_kernels.integrations import get_proper_model  # noqa: E402
from proper_kernels.integrations.user_bank import USER_PARAMS  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    random_token_seqs, randomize_adapters, tiny_causal_lm, tiny_proper_config, trained_proper_model)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _train_steps(pm, opt, users, n=2):
    """n optimizer steps on random rows of ``users``, restoring the frozen users after each."""
    for i in range(n):
        ids = torch.tensor(random_token_seqs([6] * len(users), seed=i))
        opt.zero_grad()
        pm(input_ids=ids, labels=ids, user_ids=users).loss.backward()
        opt.step()
        pm.restore_frozen_users()


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- rows and state
def test_bank_holds_every_per_user_tensor_of_every_layer():
    pm, _ = trained_proper_model()
    bank = pm.user_bank
    assert bank.num_users == pm.num_users == 4
    keys = [k for k, _ in bank.tensors()]
    assert keys == [f"{n}.{p}" for n in pm.layer_names for p in USER_PARAMS]
    state = pm.get_user_state([3, 1])
    assert list(state) == keys
    for key, p in bank.tensors():
        assert torch.equal(state[key], p.detach()[[3, 1]])
    assert _same(pm.get_user_state(2), pm.get_user_state([2]))  # an int is one user


def test_set_user_state_writes_rows_in_the_given_order():
    pm, _ = trained_proper_model()
    state = pm.get_user_state([0, 1])
    pm.set_user_state(state, [1, 0])  # swap users 0 and 1
    swapped = pm.get_user_state([1, 0])
    assert _same(swapped, state)


def test_set_user_state_writes_nothing_when_it_refuses():
    pm, _ = trained_proper_model()
    before = pm.get_user_state([0, 1])
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    last = list(bad)[-1]
    bad[last] = bad[last][:, :1]  # the last tensor has a wrong shape
    with pytest.raises(ValueError, match="expected"):
        pm.set_user_state(bad, [0, 1])
    del bad[last]
    with pytest.raises(KeyError, match="lacks"):
        pm.set_user_state(bad, [0, 1])
    extra = {k: torch.zeros_like(v) for k, v in before.items()}
    extra["nope.user_A"] = extra[last]
    with pytest.raises(ValueError, match="entries this model does not have"):
        pm.set_user_state(extra, [0, 1])
    with pytest.raises(ValueError, match=r"unknown user id\(s\) \[4\]"):
        pm.set_user_state(before, [0, 4])
    after = pm.get_user_state([0, 1])
    assert _same(after, before)


def test_partial_state_keeps_the_rows_it_leaves_out():
    pm, _ = trained_proper_model()
    before = pm.get_user_state([2])
    key_b = next(k for k in before if k.endswith("user_B"))
    pm.user_bank.set_state({key_b: torch.zeros_like(before[key_b])}, [2], partial=True)
    after = pm.get_user_state([2])
    assert after[key_b].abs().max() == 0
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != key_b)


# ---------------------------------------------------------------------- growing
def test_fit_rows_pads_a_smaller_rank_and_folds_the_scale():
    pm, _ = trained_proper_model(user_rank=4, user_alpha=4.0)  # s_u = 1
    bank = pm.user_bank
    name = pm.layer_names[0]
    layer = pm.model.get_submodule(name)
    K, d_out, d_in = layer.num_experts, layer.out_features, layer.in_features
    rows = {f"{name}.user_A": torch.randn(2, 2, d_in), f"{name}.user_B": torch.randn(2, d_out, 2),
            f"{name}.user_router": torch.randn(2, K, 2), f"{name}.user_embedding": torch.randn(2, 4)}
    fit = bank.fit_rows(rows, 2, 3.0, "two users of rank 2, s = 3")
    assert torch.equal(fit[f"{name}.user_embedding"], rows[f"{name}.user_embedding"])
    assert torch.equal(fit[f"{name}.user_A"], torch.cat([rows[f"{name}.user_A"], torch.zeros(2, 2, d_in)], 1))
    assert torch.equal(fit[f"{name}.user_router"], torch.cat([rows[f"{name}.user_router"], torch.zeros(2, K, 2)], 2))
    want_B = (rows[f"{name}.user_B"].double() * 3.0).float()
    assert torch.equal(fit[f"{name}.user_B"].float(), torch.cat([want_B, torch.zeros(2, d_out, 2)], 2))
    assert torch.equal(bank.fit_rows(rows, 2, 1.0, "s = s_u")[f"{name}.user_B"][..., :2], rows[f"{name}.user_B"])
    with pytest.raises(ValueError, match="rank 5 > the bank's user_rank 4"):
        bank.fit_rows(rows, 5, 1.0, "rank 5")


def test_user_names_name_one_row_each():
    pm, _ = trained_proper_model()
    bank = pm.user_bank
    bank.set_names({"alice": 0, 7: 2})
    bank.set_names({"bob": 0})  # row 0 keeps one name
    assert pm.user_rows == {7: 2, "bob": 0}
    bank.set_names({7: 1})  # a name names one row
    assert pm.user_rows == {"bob": 0, 7: 1}
    with pytest.raises(ValueError, match="two names for one row"):
        bank.set_names({"x": 3, "y": 3})
    with pytest.raises(TypeError, match="user names must be str or int"):
        bank.set_names({(1, 2): 3})
    with pytest.raises(ValueError, match="unknown user id"):
        bank.set_names({"z": 4})


def test_add_users_after_group_stage():
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config(num_users=2))
    pm.set_stage("group")
    randomize_adapters(pm)
    new = pm.add_users(3)
    assert new == [2, 3, 4] and pm.num_users == 5 and pm.proper_config.num_users == 5
    pm.set_stage("user")
    for _, layer in pm.adapted_layers():
        assert layer.user_A.shape[0] == 5 and layer.user_B[2:].abs().max() == 0
        assert layer.user_A.requires_grad
    ids = torch.tensor(random_token_seqs([6, 6]))
    loss = pm(input_ids=ids, labels=ids, user_ids=[4, 0]).loss
    loss.backward()
    assert pm.model.model.layers[0].mlp.up_proj.user_B.grad[4].abs().max() > 0
    assert pm.add_users(0) == [] and pm.num_users == 5
    with pytest.raises(ValueError, match="non-negative int"):
        pm.add_users(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_users_after_casting_the_model_keeps_one_dtype(dtype):
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config(num_users=0))
    pm.to(dtype)
    pm.set_stage("group")
    pm.add_users(2)
    pm.set_stage("user")
    dtypes = {n: p.dtype for n, p in pm.named_parameters()}
    assert set(dtypes.values()) == {dtype}, {n: d for n, d in dtypes.items() if d != dtype}
    ids = torch.tensor(random_token_seqs([5, 5]))
    pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss.backward()


# ---------------------------------------------------------------------- frozen users
def test_freeze_users_for_early_stopping():
    pm, _ = trained_proper_model()
    pm.freeze_users([1])
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    before = pm.get_user_state([0, 1])
    _train_steps(pm, opt, [0, 1])
    after = pm.get_user_state([0, 1])
    k = next(iter(after))
    assert torch.equal(after[k][1], before[k][1]) and not torch.equal(after[k][0], before[k][0])


def test_freeze_users_at_snapshot_then_unfreeze():
    """Early stopping's moves: pin users at a saved (best) snapshot, train, unfreeze one."""
    pm, _ = trained_proper_model()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)

    best = pm.get_user_state([2, 1])                    # "best epoch" rows, in that order
    _train_steps(pm, opt, [0, 1, 2, 3])
    moved = pm.get_user_state([1, 2])
    k = next(iter(moved))
    assert not torch.equal(moved[k][0], best[k][1])
    pm.freeze_users([2, 1], state=best)                 # written back and pinned
    assert pm.frozen_users == [1, 2]
    assert _same(pm.get_user_state([2, 1]), best)
    _train_steps(pm, opt, [0, 1, 2, 3])                 # momentum still moves rows 1, 2: restored
    assert _same(pm.get_user_state([2, 1]), best)

    pm.unfreeze_users([1])
    assert pm.frozen_users == [2]
    _train_steps(pm, opt, [1, 2])
    now = pm.get_user_state([1, 2])
    assert not torch.equal(now[k][0], best[k][1]) and torch.equal(now[k][1], best[k][0])
    pm.unfreeze_users()
    assert pm.frozen_users == []
    pm.restore_frozen_users()                           # nothing frozen: a no-op
    with pytest.raises(ValueError, match="unknown user"):
        pm.freeze_users([7])


def test_freezing_a_frozen_user_again_pins_its_new_rows():
    pm, _ = trained_proper_model()
    pm.freeze_users([0])
    pm.restore_frozen_users()  # builds the stacked rows of the frozen users
    new = {k: v + 1 for k, v in pm.get_user_state([0]).items()}
    pm.freeze_users([0, 3], state={k: torch.cat([v, pm.get_user_state([3])[k]]) for k, v in new.items()})
    pm.set_user_state({k: torch.zeros_like(v) for k, v in new.items()}, [0])
    pm.restore_frozen_users()
    assert _same(pm.get_user_state([0]), new)
    assert pm.frozen_users == [0, 3]
