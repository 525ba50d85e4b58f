"""proper_kernels.train.early_stopping: per-user early stopping on a real user bank
(a ProperModel around a one-linear module), driven by hand-written validation losses."""
import pytest
import torch
from torch import nn

from proper_kernels.integrations import ProperConfig, get_proper_model
from proper_kernels.train.early_stopping import PerUserEarlyStopping


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(6, 5)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
        return self.gate_proj(input_ids)


def _bank(num_users=4):
    torch.manual_seed(0)
    pm = get_proper_model(_Tiny(), ProperConfig(target_modules=("gate_proj",), num_experts=2, expert_rank=2,
                                                num_users=num_users, user_rank=2, population_rank=0))
    return pm


def _rows(pm, users):
    return {k: v.clone() for k, v in pm.get_user_state(users).items()}


def _nudge(pm, value):
    """Stand-in for an epoch of training: every user's rows move."""
    with torch.no_grad():
        for _, layer in pm.adapted_layers():
            layer.user_B.add_(value)
            layer.user_embedding.add_(value)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_users_keep_their_best_epoch_and_stop_after_patience():
    pm = _bank()
    es = PerUserEarlyStopping(pm, val_users=[0, 1, 2], patience=2)
    es.start({0: 5.0, 1: 5.0, 2: 5.0})
    assert pm.frozen_users == [3]                       # no validation data: frozen from the start
    start = _rows(pm, [0, 1, 2, 3])

    _nudge(pm, 0.1)
    epoch1 = _rows(pm, [0, 1, 2, 3])
    assert es.update(1, {0: 4.0, 1: 5.5, 2: 4.5}) == []   # 0 and 2 improve, 1 is stale once
    _nudge(pm, 0.1)
    assert es.update(2, {0: 4.5, 1: 6.0, 2: 4.0}) == [1]  # 1 is out of patience: back to epoch 0
    assert _same(_rows(pm, [1]), {k: v[1:2] for k, v in start.items()})
    assert es.active_users() == [0, 2]
    _nudge(pm, 0.1)
    epoch3 = _rows(pm, [0, 1, 2, 3])
    assert es.update(3, {0: 4.2, 2: 3.0}) == [0]           # 0: stale twice (best at epoch 1)
    summary = es.finish()

    assert pm.frozen_users == []
    pick = lambda state, u: {k: v[u:u + 1] for k, v in state.items()}  # noqa: E731
    now = _rows(pm, [0, 1, 2, 3])
    assert _same(pick(now, 0), pick(epoch1, 0))
    assert _same(pick(now, 1), pick(start, 1))
    assert _same(pick(now, 2), pick(epoch3, 2))
    assert _same(pick(now, 3), pick(start, 3))          # never trained
    assert summary["users_by_best_epoch"] == [1, 1, 0, 1]
    assert summary["users_without_validation"] == 1 and summary["epochs_run"] == 3
    assert summary["val_loss_start"] == pytest.approx(5.0)
    assert summary["val_loss_best"] == pytest.approx((4.0 + 5.0 + 3.0) / 3)


def test_min_delta_and_bad_arguments():
    pm = _bank(2)
    es = PerUserEarlyStopping(pm, [0, 1], patience=1, min_delta=0.5)
    es.start({0: 2.0, 1: 2.0})
    assert es.update(1, {0: 1.6, 1: 1.0}) == [0]           # 0 improved by less than min_delta
    with pytest.raises(ValueError, match="patience"):
        PerUserEarlyStopping(pm, [0], patience=0)
    with pytest.raises(ValueError, match="lacks validation users"):
        PerUserEarlyStopping(pm, [0, 1]).start({0: 1.0})
