"""``ProperModel``: a Hugging Face causal LM with PROPER-adapted linears, and the
three-stage pipeline (population -> group -> user).

Nothing here imports transformers: the wrapped model is any ``nn.Module`` whose
targeted projections are ``nn.Linear`` and whose forward returns an object with
``.loss`` / ``.logits`` (every HF causal LM). peft is imported only by the PEFT
import/export functions (:mod:`proper_kernels.integrations.peft_io`).

The class is composed of:

* :class:`.stages.StagesMixin`: set_stage, merge_population, aux_loss, user routing;
* :class:`.user_bank.UserBank` (``self.user_bank``): the per-user rows of every
  adapted layer and the frozen users; the per-user methods here delegate to it;
* :class:`.persistence.PersistenceMixin`: save_pretrained, from_pretrained,
  load_users, PEFT import/export.

Usage::

    pm = get_proper_model(model, ProperConfig(num_users=100))
    pm.set_stage("population"); train(pm)          # one shared LoRA
    pm.set_stage("group");      train(pm)          # merges it, trains experts + router + e_u
    pm.set_stage("user");       train(pm)          # e_u, A_u, B_u, V_u of every user
    pm.generate(input_ids, attention_mask=m, user_ids=[3, 7, -1], max_new_tokens=20)

Serving plain PEFT LoRA adapters, one per user, in mixed batches (no stage, no experts)::

    pm = ProperModel.from_peft_users(model, {"alice": dir1, 7: dir2})  # or a parent directory
    pm.generate(input_ids, user_ids=[pm.user_rows["alice"], pm.user_rows[7], -1], max_new_tokens=20)
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ..layers.linear import ProperLinear
from .config import ProperConfig
from .persistence import CONFIG_NAME, WEIGHTS_NAME, PersistenceMixin, register_tied_weight_hooks
from .stages import STAGES, StagesMixin
from .user_bank import UserBank, UserIds, UserName

__all__ = ["ProperModel", "get_proper_model", "STAGES", "CONFIG_NAME", "WEIGHTS_NAME"]


def _find_targets(model: nn.Module, targets: Tuple[str, ...]) -> List[Tuple[str, nn.Module, str, nn.Linear]]:
    """(module path, parent, attribute, linear) of every nn.Linear whose attribute name
    is in ``targets``; ValueError naming the targets that match no nn.Linear, with the
    nn.Linear names the model has."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if attr in targets and isinstance(child, nn.Linear):
                full = f"{name}.{attr}" if name else attr
                found.append((full, module, attr, child))
    missing = [t for t in targets if t not in {attr for _, _, attr, _ in found}]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {missing} in {type(model).__name__} (ProperConfig.target_modules="
                         f"{list(targets)}); its nn.Linear names are {linears}")
    return found


def get_proper_model(model: nn.Module, config: Optional[ProperConfig] = None) -> "ProperModel":
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place by
    :class:`ProperLinear` and wrap it.

    Every parameter of ``model`` is frozen. No stage is active at creation (every
    adapter part is switched off), so the logits are exactly the base model's; call
    :meth:`ProperModel.set_stage` to start training. Every name in
    ``config.target_modules`` must name an nn.Linear of ``model`` (ValueError listing
    the nn.Linear names it has otherwise).

    Args:
        model: a causal LM (any architecture whose targeted projections are nn.Linear:
            Llama, Qwen2, Mistral, ...). Modified in place.
        config: :class:`ProperConfig` (default: ``ProperConfig()``).
    """
    config = config or ProperConfig()
    return ProperModel(model, config)


class ProperModel(StagesMixin, PersistenceMixin, nn.Module):
    """A causal LM whose targeted linears are :class:`ProperLinear`.

    ``forward(..., user_ids=[B])`` / ``generate(..., user_ids=[B])`` take one user id
    per row (-1: no user, population/group parts only). The routing of the batch is
    built once per call and shared by every adapted layer.

    Attributes:
        model: the wrapped (modified in place) causal LM.
        proper_config: a copy of the :class:`ProperConfig`; ``num_users`` tracks the bank size.
        stage: None (nothing active), "population", "group" or "user".
        population_merged: whether the population LoRA was folded into W0.
        loaded_adapters: the parts ("population", "user") whose adapters were loaded
            (PEFT import, :meth:`load_users`, :meth:`from_peft_users`): they are on for
            forward and generate in every stage (loading trains nothing).
        user_bank: the :class:`UserBank` of the adapted layers (per-user rows, frozen
            users, user names); a :class:`~.paged.PagedUserBank` with
            ``ProperConfig(user_bank="paged")``, whose layers then hold
            ``user_cache_size`` device slots instead of ``num_users`` rows.

    ``bank_source`` / ``bank_mmap`` (used by :meth:`from_pretrained`): a paged bank
    reads its rows from this :class:`~.bank_io.SafetensorsFile` instead of drawing
    fresh ones, mapped copy-on-write with ``bank_mmap``.
    """

    def __init__(self, model: nn.Module, config: ProperConfig, *, bank_source=None, bank_mmap: bool = False):
        super().__init__()
        self.model = model
        self.proper_config = copy.deepcopy(config)  # add_users / PEFT import update it: not the caller's
        self.stage: Optional[str] = None
        self.stages_done: List[str] = []
        self.population_merged = False
        self.loaded_adapters: Set[str] = set()
        # Population LoRA factors kept after merging (for save/load and PEFT export).
        self._merged_population: Dict[str, Tuple[Tensor, Tensor]] = {}
        self.last_aux_losses: Dict[str, Tensor] = {}
        targets = _find_targets(model, config.target_modules)  # raises before the model is touched
        for p in model.parameters():
            p.requires_grad_(False)
        self.layer_names: List[str] = []
        paged = config.user_bank == "paged"
        for full, parent, attr, lin in targets:
            layer = ProperLinear(
                lin,
                num_experts=config.num_experts, expert_rank=config.expert_rank, expert_alpha=config.expert_alpha,
                router=config.router, user_embed_dim=config.user_embed_dim,
                num_users=config.user_cache_size if paged else config.num_users,
                user_rank=config.user_rank, user_alpha=config.user_alpha, user_router=config.user_router,
                population_rank=config.population_rank, population_alpha=config.population_alpha,
                top_k=config.top_k, freeze_base=True,
                backend=None if config.backend == "auto" else config.backend,
            )
            setattr(parent, attr, layer)
            self.layer_names.append(full)
        if paged:
            from .paged import PagedUserBank

            self.user_bank = PagedUserBank(list(self.adapted_layers()), self.proper_config, source=bank_source,
                                           mmap=bank_mmap)
        else:
            self.user_bank = UserBank(list(self.adapted_layers()), self.proper_config)
        self._apply_stage_flags(None)
        register_tied_weight_hooks(self)

    # ------------------------------------------------------------------ passthrough
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def adapted_layers(self) -> Iterator[Tuple[str, ProperLinear]]:
        """(module path in ``self.model``, ProperLinear) for every adapted linear."""
        for name in self.layer_names:
            yield name, self.model.get_submodule(name)

    @property
    def num_users(self) -> int:
        return self.user_bank.num_users

    @property
    def user_rows(self) -> Dict[UserName, int]:
        """``{user name: row}`` of the named users (:meth:`from_peft_users` names a
        row by its adapter's name); pass the rows as ``user_ids``. A copy."""
        return dict(self.user_bank.names)

    # ------------------------------------------------------------------ per-user state (UserBank)
    def add_users(self, n: int) -> List[int]:
        """Grow the user bank by ``n`` users with fresh parameters (B_u, V_u at zero, so
        a new user starts at the group-level output). Returns the new ids.

        Resident: replaces the banked Parameters, so build a torch optimizer after
        calling this (:meth:`make_optimizer`'s follows the bank). Paged: appends host
        rows; the device slots stay as they are.
        """
        new = self.user_bank.add(n)
        self._apply_stage_flags(self.stage)
        return new

    def get_user_state(self, users: UserIds) -> Dict[str, Tensor]:
        """Copies of the per-user parameters of ``users`` (rows stacked in that order):
        ``{"<layer>.<param>": tensor[len(users), ...]}``. For early stopping keep the
        best one and write it back with :meth:`set_user_state`."""
        return self.user_bank.get_state(users)

    def set_user_state(self, state: Dict[str, Tensor], users: UserIds) -> None:
        """Write rows from :meth:`get_user_state` into the bank at ids ``users``.
        Everything is checked first: on an error nothing is written."""
        self.user_bank.set_state(state, users)

    def freeze_users(self, users: UserIds, state: Optional[Dict[str, Tensor]] = None) -> None:
        """Per-user early stopping: pin the parameters of ``users``.

        Remembers their current rows (or, with ``state`` from :meth:`get_user_state`
        of these ``users`` in this order, writes those rows first, e.g. the best
        snapshot so far, and pins them). :meth:`restore_frozen_users` (call it after
        each optimizer step) writes the pinned rows back, so they stay fixed whatever
        the optimizer (momentum, weight decay) does. Freezing a frozen user again
        re-pins it at the new values. Only the per-user rows are stored, never the
        shared parameters."""
        self.user_bank.freeze(users, state)

    def unfreeze_users(self, users: Optional[UserIds] = None) -> None:
        """Let ``users`` (default: every frozen user) train again; their current
        rows are kept."""
        self.user_bank.unfreeze(users)

    @property
    def frozen_users(self) -> List[int]:
        """Ids of the users pinned by :meth:`freeze_users`, ascending."""
        return self.user_bank.frozen

    def restore_frozen_users(self) -> None:
        """Write the pinned rows of every frozen user back (one indexed write per
        bank tensor, however many users are frozen)."""
        self.user_bank.restore_frozen()

    def sync_users(self) -> None:
        """Paged bank: write the rows (and optimiser state) changed in the device
        slots back to host memory; :meth:`save_pretrained` calls it. Resident: nothing."""
        self.user_bank.sync()

    # ------------------------------------------------------------------ distributed (see .distributed)
    def shard_users(self, rank: int, world_size: int):
        """Keep only the users rank ``rank`` of ``world_size`` owns (u % world_size ==
        rank); user ids stay global. Wrapping in DDP or FSDP2 afterwards
        (:func:`.distributed.fully_shard_model`) reduces the shared parameters only.
        See :func:`proper_kernels.integrations.distributed.shard_users`."""
        from .distributed import shard_users

        return shard_users(self, rank, world_size)

    # ------------------------------------------------------------------ optimiser
    def make_optimizer(self, lr: float = 1e-3, weight_decay: float = 1e-2, betas: Tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8):
        """The optimiser of this model, in either bank mode
        (:class:`~.optim.ProperOptimizer`): AdamW for the trainable shared parameters
        (those trainable now), lazy per-user AdamW for the bank's rows: a user absent
        from the batches since the last step does not move (no weight decay, no
        momentum) and counts its own steps; frozen users do not move. A paged run and
        a resident run with it take the same steps. The paged bank needs it (a torch
        optimizer over ``parameters()`` would mix the users that share a slot)."""
        from .optim import ProperOptimizer

        banked = {id(p) for _, p in self.user_bank.tensors()}
        shared = [p for p in self.trainable_parameters() if id(p) not in banked]
        return ProperOptimizer(shared, self.user_bank, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, user_ids: Optional[UserIds] = None, **kwargs):
        """The wrapped model's forward with ``user_ids`` (int [B], one user per row,
        -1 = no user). In the group stage (and the user stage if
        ``aux_in_user_stage``) the auxiliary losses are added to ``.loss`` when
        labels are given. Other kwargs go to the wrapped model."""
        self._prepare_routing(input_ids, user_ids, kwargs)
        keep = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            out = self._add_aux_loss(out, labels, attention_mask)
            # Under gradient checkpointing the backward re-runs the layers: they need
            # the routing then, so it stays until the next call (or clear_routing()).
            keep = self._gc_active()
            return out
        finally:
            if not keep:
                self._set_routing(None)

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 user_ids: Optional[UserIds] = None, **kwargs):
        """``model.generate`` with one user per row. The routing plan is cached per
        step shape (prompt, then each decode step), shared by every layer. Rows
        expanded by ``num_beams`` / ``num_return_sequences`` keep their row's user."""
        self._set_routing(self._generate_routing(input_ids, user_ids, kwargs))
        try:
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            return self.model.generate(input_ids=input_ids, **kwargs)
        finally:
            self._set_routing(None)

    # ------------------------------------------------------------------ HF niceties
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Enable HF activation checkpointing on the wrapped model (non-reentrant by
        default, so the routing and aux losses stay differentiable)."""
        kw = {"use_reentrant": False}
        kw.update(gradient_checkpointing_kwargs or {})
        m = self._modules["model"]
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)

    def gradient_checkpointing_disable(self):
        m = self._modules["model"]
        (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
