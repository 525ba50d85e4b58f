"""The optimiser of a :class:`ProperModel`: AdamW for the shared parameters and a
lazy, per-user AdamW for the rows of the user bank (``pm.make_optimizer(...)``).

One AdamW step of a tensor p with gradient g (decoupled weight decay, as
``torch.optim.AdamW`` without amsgrad)::

    t   <- t + 1
    p   <- p (1 - lr wd)
    m   <- beta1 m + (1 - beta1) g
    v   <- beta2 v + (1 - beta2) g^2
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

User rows step lazily: a row is stepped only when its user was in the batch (a
forward that trained since the last step) and is not frozen; then that row, its
moments and *its own* step count t move as above. A user absent from the batch does
not move at all (no weight decay, no momentum), and its t counts only the steps it
took part in. The state of a row (m, v, t) is the bank's: it pages in and out with the
row (:class:`~proper_kernels.integrations.paged.PagedUserBank`), so a paged run and a
resident run take the same steps, row for row.

The shared parameters (the trainable ones that are not bank rows) step as with
``torch.optim.AdamW``, every step. Param groups: ``"shared"`` (those parameters) and
``"users"`` (no parameters listed: its ``lr``, ``betas``, ``eps`` and
``weight_decay`` apply to the bank rows), so an LR scheduler scales both.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["ProperOptimizer", "adamw_update"]


@torch.no_grad()
def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Union[float, Tensor], *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (same
    shape as ``grad``). ``step``: the new step count t, a number, or a tensor that
    broadcasts to ``param`` (one t per row). The formula is the module's."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(step, Tensor):
        t = step.double()
        step_size = (lr / (1 - torch.pow(beta1, t))).to(param.dtype)
        bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt().to(param.dtype)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        param.sub_(exp_avg / denom * step_size)
    else:
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class ProperOptimizer(torch.optim.Optimizer):
    """AdamW for ``shared`` parameters and lazy per-user AdamW for the rows of ``bank``
    (a :class:`~proper_kernels.integrations.user_bank.UserBank` or its paged form).
    Build it with :meth:`ProperModel.make_optimizer`.

    Args:
        shared: the trainable parameters that are not bank rows (may be empty).
        bank: the model's user bank; its rows that train (``requires_grad``) are stepped.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, for both parts.
    """

    def __init__(self, shared: Sequence[nn.Parameter], bank, *, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps!r}, weight_decay={weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__([{"params": list(shared), "name": "shared"}, {"params": [], "name": "users"}], defaults)
        self.bank = bank

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One step: every shared parameter with a gradient, then the bank rows of the
        batch's users (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shared, users = self.param_groups
        for p in shared["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            st["step"] += 1
            adamw_update(p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], **self._hyper(shared))
        self._step_rows(users)
        return loss

    @staticmethod
    def _hyper(group) -> dict:
        return dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _step_rows(self, group) -> None:
        rows = self.bank.begin_step()
        try:
            if rows is None or rows.numel() == 0:
                return
            for params, st in self.bank.optim_state():
                live = [i for i, p in enumerate(params) if p.requires_grad and p.grad is not None]
                if not live:
                    continue
                r = rows.to(params[0].device)
                if len(live) == len(params):
                    at = (slice(None), r)  # [layers, rows] of the group's state
                else:
                    lv = torch.tensor(live).to(r.device, non_blocking=True)
                    at = (lv[:, None], r[None, :])
                p = torch.stack([params[i].detach().index_select(0, r) for i in live])
                g = torch.stack([params[i].grad.index_select(0, r) for i in live]).to(p.dtype)
                m, v = st["exp_avg"][at], st["exp_avg_sq"][at]
                t = st["step"][at] + 1
                adamw_update(p, g, m, v, t.view(t.shape + (1,) * (p.dim() - 2)), **self._hyper(group))
                st["exp_avg"][at], st["exp_avg_sq"][at], st["step"][at] = m, v, t
                for j, i in enumerate(live):
                    params[i].detach().index_copy_(0, r, p[j])
        finally:
            self.bank.end_step(rows)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of the shared parameters and of the bank rows."""
        super().zero_grad(set_to_none)
        for _, p in self.bank.tensors():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()
