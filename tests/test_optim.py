"""The optimiser of ProperModel (proper_kernels.integrations.optim, pm.make_optimizer):
AdamW for the shared parameters, lazy per-user AdamW for the user rows (an absent user
does not move and counts its own steps; frozen users do not move), on a tiny random
Llama (CPU)."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from proper_kernels.integrations.optim import adamw_update  # noqa: E402
from proper_kernels.testing import random_token_seqs, trained_proper_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HYPER = dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)


def _step(pm, opt, users, seed):
    ids = torch.tensor(random_token_seqs([6] * len(users), seed=seed))
    opt.zero_grad()
    pm(input_ids=ids, labels=ids, user_ids=users).loss.backward()
    opt.step()


def _rows(pm):
    return {k: v.clone() for k, v in pm.get_user_state(list(range(pm.num_users))).items()}


def test_adamw_update_is_torch_adamw():
    g = torch.Generator().manual_seed(0)
    p0, grads = torch.randn(5, 3, generator=g), [torch.randn(5, 3, generator=g) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    mine, m, v = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    rows, mr, vr = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    for t, gr in enumerate(grads, start=1):
        ref.grad = gr
        opt.step()
        kw = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
        adamw_update(mine, gr, m, v, float(t), **kw)
        adamw_update(rows, gr, mr, vr, torch.full((5, 1), float(t)), **kw)  # one step count per row
    assert torch.equal(mine, ref.detach())  # the scalar path is torch's, op for op
    torch.testing.assert_close(rows, ref.detach(), rtol=1e-6, atol=1e-7)


def test_every_user_in_every_batch_steps_as_torch_adamw():
    """Group stage: shared experts/routers and the users' e_u rows; all users in every
    batch, so lazy AdamW and torch.optim.AdamW take the same steps."""
    pm, _ = trained_proper_model(num_users=4)
    pm.set_stage("group")
    ref = copy.deepcopy(pm)
    opt = pm.make_optimizer(**HYPER)
    ropt = torch.optim.AdamW(ref.trainable_parameters(), foreach=False, **HYPER)
    assert opt.param_groups[0]["params"] and opt.param_groups[1]["params"] == []
    pm.train()
    ref.train()
    for i in range(3):
        _step(pm, opt, [0, 1, 2, 3, 1], i)
        _step(ref, ropt, [0, 1, 2, 3, 1], i)
    for (n, a), b in zip(pm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for k, v in _rows(pm).items():
        torch.testing.assert_close(v, _rows(ref)[k], rtol=1e-5, atol=1e-6)


def test_absent_users_do_not_move_and_count_their_own_steps():
    pm, _ = trained_proper_model(num_users=4)
    opt = pm.make_optimizer(**HYPER)  # weight decay > 0: a plain AdamW would move every row
    pm.train()
    start = _rows(pm)
    _step(pm, opt, [0, 0], 0)
    _step(pm, opt, [0, 2], 1)
    with torch.no_grad():  # an evaluation forward puts nobody in the next step's batch
        pm(input_ids=torch.tensor(random_token_seqs([6], seed=9)), user_ids=[3])
    _step(pm, opt, [0, -1], 2)
    now = _rows(pm)
    for k in now:
        for u, moved in ((0, True), (1, False), (2, True), (3, False)):
            assert torch.equal(now[k][u], start[k][u]) != moved, (k, u)
    steps = [st["step"] for _, st in pm.user_bank.optim_state()]
    for s in steps:
        assert s[:, :4].tolist() == [[3.0, 0.0, 1.0, 0.0]] * s.shape[0]

    # user 2 took one step: exactly a fresh AdamW's first step on its rows and gradient
    pm2, _ = trained_proper_model(num_users=4)
    opt2 = pm2.make_optimizer(**HYPER)
    pm2.train()
    _step(pm2, opt2, [0, 0], 0)
    ids = torch.tensor(random_token_seqs([6, 6], seed=1))
    opt2.zero_grad()
    pm2(input_ids=ids, labels=ids, user_ids=[0, 2]).loss.backward()
    grads = {f"{n}.{p}": getattr(layer, p).grad[2].clone() for n, layer in pm2.adapted_layers()
             for p in ("user_A", "user_B", "user_router", "user_embedding")}
    opt2.step()
    for k, g in grads.items():
        want = start[k][2].clone()
        adamw_update(want, g, torch.zeros_like(g), torch.zeros_like(g), 1.0, lr=HYPER["lr"], beta1=0.8, beta2=0.95,
                     eps=1e-6, weight_decay=0.1)
        torch.testing.assert_close(_rows(pm2)[k][2], want, rtol=1e-6, atol=1e-7)


def test_frozen_users_schedulers_and_new_users():
    pm, _ = trained_proper_model(num_users=4)
    opt = pm.make_optimizer(**HYPER)
    pm.train()
    pm.freeze_users([1])
    start = _rows(pm)
    _step(pm, opt, [0, 1], 0)
    now = _rows(pm)
    assert all(torch.equal(now[k][1], start[k][1]) for k in now)  # frozen: not stepped at all
    assert not all(torch.equal(now[k][0], start[k][0]) for k in now)

    # an LR scheduler scales the user rows too (lr 0 and decoupled decay: nothing moves)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    _step(pm, opt, [0, 2], 1)
    assert all(torch.equal(v, now[k]) for k, v in _rows(pm).items())

    # the optimiser follows the bank: users added after it was built train with it
    opt = pm.make_optimizer(**HYPER)
    new = pm.add_users(1)[0]
    before = _rows(pm)
    _step(pm, opt, [new, 0], 2)
    after = _rows(pm)
    assert any(not torch.equal(after[k][new], before[k][new]) for k in after)


def test_rows_of_a_parameter_that_does_not_train_stay():
    pm, _ = trained_proper_model(num_users=4)
    name, layer = next(iter(pm.adapted_layers()))
    layer.user_A.requires_grad_(False)  # one layer of a group of same-shaped parameters
    opt = pm.make_optimizer(**HYPER)
    start = _rows(pm)
    _step(pm, opt, [0, 0], 0)
    now = _rows(pm)
    assert torch.equal(now[f"{name}.user_A"], start[f"{name}.user_A"])
    assert all(not torch.equal(now[k][0], start[k][0]) for k in now if k != f"{name}.user_A")
