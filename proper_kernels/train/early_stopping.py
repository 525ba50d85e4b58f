"""Per-user early stopping of the user stage, independent of the data format.

Each user's validation loss is known before the stage (epoch 0: the rows the stage
starts from; with a fresh bank B_u = 0 and V_u = 0, i.e. the group-stage output) and
after every epoch. A user that improved by more than ``min_delta`` gets its rows
(e_u, A_u, B_u, V_u of every layer, via ``get_user_state``) kept as its best; a user
that has not improved for ``patience`` epochs is set back to its best rows and frozen
(``freeze_users``), and the training loop drops its examples and calls
``pm.restore_frozen_users()`` after each optimizer step. Users without validation
data are frozen from the start. :meth:`PerUserEarlyStopping.finish` sets every user to
its best rows, so no user ends with a validation loss above its epoch-0 one: a
user's output depends only on the frozen shared parameters and its own rows.

    es = PerUserEarlyStopping(pm, val_users, patience=2)
    es.start(val_loss)                      # {user row: loss} at epoch 0
    for epoch in range(1, max_epochs + 1):
        active = es.active_users()
        if not active:
            break
        ...one epoch on the examples of ``active``, pm.restore_frozen_users() after each step...
        es.update(epoch, val_loss_of(active))
    summary = es.finish()
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch

__all__ = ["PerUserEarlyStopping"]


class PerUserEarlyStopping:
    """See the module docstring. ``val_users``: bank rows that have validation data."""

    def __init__(self, pm, val_users: Iterable[int], patience: int = 2, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience!r}")
        self.pm = pm
        self.val_users = sorted(set(int(u) for u in val_users))
        self.patience = patience
        self.min_delta = min_delta
        self.all_ids = list(range(pm.num_users))
        self.best_loss: Dict[int, float] = {}
        self.start_loss: Dict[int, float] = {}
        self.best_epoch: Dict[int, int] = {}
        self.stale: Dict[int, int] = {}
        self.best_state = None
        self.epochs_run = 0

    def start(self, val_loss: Dict[int, float]) -> None:
        """Record epoch 0 (``val_loss`` of every validation user) and freeze the users
        that have no validation data."""
        missing = [u for u in self.val_users if u not in val_loss]
        if missing:
            raise ValueError(f"val_loss lacks validation users {missing[:8]}")
        self.best_loss = {u: float(val_loss[u]) for u in self.val_users}
        self.start_loss = dict(self.best_loss)
        self.best_epoch = {u: 0 for u in self.val_users}
        self.stale = {u: 0 for u in self.val_users}
        self.best_state = self.pm.get_user_state(self.all_ids) if self.all_ids else {}
        self.pm.unfreeze_users()
        have = set(self.val_users)
        no_val = [u for u in self.all_ids if u not in have]
        if no_val:
            self.pm.freeze_users(no_val)
        self.no_val = len(no_val)

    def active_users(self) -> List[int]:
        """Validation users still training."""
        frozen = set(self.pm.frozen_users)
        return [u for u in self.val_users if u not in frozen]

    def update(self, epoch: int, val_loss: Dict[int, float]) -> List[int]:
        """After ``epoch``: keep improved users' rows, freeze the users out of patience at
        their best. ``val_loss`` covers the active users. Returns the users frozen now."""
        active = self.active_users()
        self.epochs_run = epoch
        improved = [u for u in active if val_loss[u] < self.best_loss[u] - self.min_delta]
        if improved:
            cur = self.pm.get_user_state(improved)
            rows = torch.tensor(improved)
            for k, v in cur.items():
                self.best_state[k][rows] = v
            for u in improved:
                self.best_loss[u], self.best_epoch[u], self.stale[u] = float(val_loss[u]), epoch, 0
        stop = []
        done = set(improved)
        for u in active:
            if u not in done:
                self.stale[u] += 1
                if self.stale[u] >= self.patience:
                    stop.append(u)
        if stop:
            rows = torch.tensor(stop)
            self.pm.freeze_users(stop, state={k: v[rows] for k, v in self.best_state.items()})
        return stop

    def finish(self) -> Dict[str, object]:
        """Unfreeze everyone and set every user to its best rows. Returns a summary:
        epochs run, users by best epoch (0 = the starting rows kept), users without
        validation data, mean validation loss at the start and at the best epochs."""
        self.pm.unfreeze_users()
        if self.all_ids:
            self.pm.set_user_state(self.best_state, self.all_ids)
        hist = [0] * (self.epochs_run + 1)
        for u in self.val_users:
            hist[self.best_epoch[u]] += 1
        mean = lambda d: (sum(d.values()) / len(d)) if d else float("nan")  # noqa: E731
        return {"epochs_run": self.epochs_run, "users_by_best_epoch": hist, "users_without_validation": self.no_val,
                "val_loss_start": mean(self.start_loss), "val_loss_best": mean(self.best_loss)}
