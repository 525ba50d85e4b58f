"""The three stages of a :class:`ProperModel` (what exists, what trains), the merge
of the population LoRA, the auxiliary losses, and the per-batch user routing.

Stages (:meth:`StagesMixin.set_stage`)::

    population   A_p, B_p train                              (one shared LoRA)
    group        population merged into W0; experts, W_r, W_e and E train (+ aux losses)
    user         every part on; only the per-user rows (E, A_u, B_u, V_u) train

Loaded adapters take part whatever the stage: loading user adapters (PEFT import,
``load_users``, ``from_peft_users``) switches the user LoRA A_u, B_u and V_u on for
forward and generate, and a PEFT population LoRA loaded before the merge switches the
population LoRA on. Loading unfreezes nothing: what trains is the stage's alone.
The parts loaded are ``ProperModel.loaded_adapters`` (saved with the model).

Routing: a forward or generate call takes one user id per row; the ids are checked
once, turned into the rows the kernels index by the user bank (``UserBank.route``:
the ids themselves when resident, slot ids after paging the users in when paged), and
one :class:`~proper_kernels.layers.UserRouting` (routing plans cached per input
shape) is set on every adapted layer for the duration of the call.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, TypeVar

import torch
from torch import Tensor, nn

from ..layers.linear import UserRouting
from ..reference.losses import balance_from_importance
from .distributed import global_importance
from .user_bank import USER_PARAMS, UserIds

__all__ = ["StagesMixin", "STAGES", "POPULATION_PARAMS", "GROUP_PARAMS", "SHARED_PARAMS", "ADAPTER_PARAMS",
           "TRAINABLE"]

STAGES = ("population", "group", "user")

# Which ProperLinear parameters belong to which stage.
POPULATION_PARAMS = ("population_A", "population_B")
GROUP_PARAMS = ("expert_A", "expert_B", "router_weight", "user_embed_proj")
SHARED_PARAMS = POPULATION_PARAMS + GROUP_PARAMS  # one tensor for all users; USER_PARAMS: a row per user
ADAPTER_PARAMS = SHARED_PARAMS + USER_PARAMS
# What each stage trains (the user embedding row is per-user, but the group stage
# trains it too: the user-aware router cannot route users without it).
TRAINABLE = {
    "population": POPULATION_PARAMS,
    "group": GROUP_PARAMS + ("user_embedding",),
    "user": USER_PARAMS,
}

_Model = TypeVar("_Model", bound="StagesMixin")


class StagesMixin:
    """Stage switching, population merge, auxiliary losses and user routing of
    :class:`~proper_kernels.integrations.ProperModel`.

    Uses the model's ``proper_config``, ``stage``, ``stages_done``,
    ``population_merged``, ``_merged_population`` (population factors kept after the
    merge), ``loaded_adapters``, ``last_aux_losses``, ``num_users``,
    ``adapted_layers()`` and the wrapped ``model``.
    """

    # ------------------------------------------------------------------ stages
    def _apply_stage_flags(self, stage: Optional[str]) -> None:
        """Switch each layer's parts on for ``stage`` and the loaded adapters, and set
        requires_grad on what ``stage`` trains (loading trains nothing)."""
        trainable = set(TRAINABLE.get(stage, ()))
        population_on = stage == "population" or "population" in self.loaded_adapters
        users_on = stage == "user" or "user" in self.loaded_adapters
        for _, layer in self.adapted_layers():
            layer.use_population = population_on and layer.population_A is not None
            has_e = layer.expert_A is not None
            layer.use_experts = stage in ("group", "user") and has_e
            layer.use_user_bias = stage in ("group", "user") and layer.user_embedding is not None
            layer.use_user_lora = users_on and layer.user_A is not None
            layer.use_user_router = users_on and layer.user_router is not None
            # form the diversity loss in forward, where FSDP2 has the experts whole
            layer.track_diversity = self._aux_on(stage) and bool(self.proper_config.diversity_weight)
            for pname in ADAPTER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    p.requires_grad_(pname in trainable)

    def _adapters_loaded(self, part: str) -> None:
        """Switch ``part`` ("population" or "user"), whose adapters were just loaded,
        on for forward and generate in every stage; nothing more trains."""
        if part not in ("population", "user"):
            raise ValueError(f"part must be 'population' or 'user', got {part!r}")
        self.loaded_adapters.add(part)
        self._apply_stage_flags(self.stage)

    def set_stage(self: _Model, stage: str) -> _Model:
        """Switch what exists and what trains.

        * ``"population"``: the population LoRA only (A_p, B_p trainable).
        * ``"group"``: merges the population LoRA into W0 first (once), then experts,
          token router W_r, W_e and the user embeddings E train; the balance and
          diversity losses are added to the LM loss when labels are given.
        * ``"user"``: everything on; only the per-user parts (E rows, A_u, B_u, V_u)
          train. Requires the group stage first (when the config has experts).

        Everything else (the base model included) stays frozen. Adapters that were
        loaded (``loaded_adapters``) stay on in every stage. Serving loaded user
        adapters needs no stage at all. Returns self.
        """
        cfg = self.proper_config
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "population":
            if not cfg.population_rank:
                raise ValueError("the population stage needs ProperConfig.population_rank > 0")
            if self.population_merged:
                raise RuntimeError("the population LoRA is already merged into the base weights; "
                                   "the population stage cannot be re-entered")
        if stage == "group":
            if not cfg.num_experts:
                raise ValueError("the group stage needs ProperConfig.num_experts > 0")
        if stage == "user":
            if not (cfg.num_users and cfg.user_rank):
                raise ValueError("the user stage needs ProperConfig.num_users > 0 and user_rank > 0 "
                                 "(or add_users(n) first)")
            if cfg.num_experts and "group" not in self.stages_done:
                raise RuntimeError(
                    "user stage before group stage: call set_stage('group') and train the group level first "
                    "(the user stage freezes the experts and the router), or build the model with "
                    "ProperConfig(num_experts=0) to train user LoRAs alone. Serving loaded user adapters needs no "
                    "stage: load_peft_adapter(dir, user=u) and load_users(dir) switch them on, and "
                    "ProperModel.from_peft_users(model, {name: peft_dir}) serves plain PEFT adapters, one per user")
        if stage in ("group", "user") and not self.population_merged:
            self.merge_population()
        self.stage = stage
        if stage not in self.stages_done:
            self.stages_done.append(stage)
        self._apply_stage_flags(stage)
        return self

    @torch.no_grad()
    def merge_population(self) -> None:
        """Fold every layer's population LoRA into its W0 (logits unchanged up to
        rounding). The factors are kept aside for :meth:`save_pretrained` and PEFT export.

        A W0 that the model uses elsewhere too (an adapted ``lm_head`` tied to the input
        embedding) is untied first: the merge goes into a copy of its own, so the other
        user of the weight keeps the base values."""
        shared = self._shared_weights()
        for name, layer in self.adapted_layers():
            if layer.population_A is not None:
                self._merged_population[name] = (layer.population_A.detach().clone(),
                                                  layer.population_B.detach().clone())
                if id(layer.weight) in shared:
                    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                layer.merge_population()
        self.population_merged = True
        self.loaded_adapters.discard("population")  # in W0 now

    def _shared_weights(self) -> set:
        """ids of the adapted layers' W0 that more than one place of the model holds."""
        seen: Dict[int, int] = {}
        for _, p in self._modules["model"].named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        return {id(layer.weight) for _, layer in self.adapted_layers() if seen.get(id(layer.weight), 0) > 1}

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ------------------------------------------------------------------ auxiliary losses
    def _aux_on(self, stage: Optional[str]) -> bool:
        """Whether ``stage`` adds the auxiliary losses (when labels are given)."""
        return stage == "group" or (stage == "user" and self.proper_config.aux_in_user_stage)

    def aux_loss(self, attention_mask: Optional[Tensor] = None) -> Tensor:
        """balance_weight * mean_layers balance(last gates) + diversity_weight *
        mean_layers diversity(experts), from the last forward. Also stored in
        ``last_aux_losses``.

        In data-parallel training the balance is that of the global batch: each
        layer's per-expert gate mass is summed over the ranks first
        (:func:`.distributed.global_importance`, one all_reduce for all layers)."""
        cfg = self.proper_config
        bal, div, n = 0.0, 0.0, 0
        masses = []
        for _, layer in self.adapted_layers():
            if not layer.use_experts:
                continue
            mask = None
            g = layer.last_gates
            if attention_mask is not None and g is not None and tuple(g.shape[:-1]) == tuple(attention_mask.shape):
                mask = attention_mask.bool()
            if cfg.balance_weight and g is not None:
                masses.append(layer.gate_importance(mask))
            if cfg.diversity_weight:
                div = div + layer.diversity_loss()
            n += 1
        for mass in global_importance(self, masses):
            bal = bal + balance_from_importance(mass)
        if n == 0:
            zero = torch.zeros(())
            self.last_aux_losses = {"balance": zero, "diversity": zero}
            return zero
        bal, div = torch.as_tensor(bal) / n, torch.as_tensor(div) / n
        self.last_aux_losses = {"balance": bal.detach(), "diversity": div.detach()}
        return cfg.balance_weight * bal + cfg.diversity_weight * div

    def _add_aux_loss(self, out, labels: Optional[Tensor], attention_mask: Optional[Tensor]):
        """``out`` with :meth:`aux_loss` added to its loss, when labels are given in the
        group stage (or the user stage with ``aux_in_user_stage``). ``out`` is a model
        output with ``.loss`` or a ``return_dict=False`` tuple (loss, logits, ...)."""
        cfg = self.proper_config
        add_aux = self._aux_on(self.stage)
        if labels is None or not add_aux or not (cfg.balance_weight or cfg.diversity_weight):
            return out
        if isinstance(out, tuple):
            if out and isinstance(out[0], Tensor) and out[0].dim() == 0:
                out = (out[0] + self.aux_loss(attention_mask).to(out[0].device, out[0].dtype),) + out[1:]
        else:
            loss = getattr(out, "loss", None)
            if loss is not None:
                out.loss = loss + self.aux_loss(attention_mask).to(loss.device, loss.dtype)
        return out

    # ------------------------------------------------------------------ routing
    def _needs_users(self) -> bool:
        for _, layer in self.adapted_layers():
            if layer.use_user_lora or (layer.use_experts and layer.use_user_bias):
                return True
        return False

    def _check_user_ids(self, user_ids: Optional[UserIds], batch: int, device) -> Optional[Tensor]:
        if user_ids is None:
            if self._needs_users():
                why = (f"stage {self.stage!r}" if self.stage in ("group", "user")
                       else "user adapters were loaded: they are on in every stage")
                raise ValueError(f"this model has per-user parameters ({why}): pass user_ids (one id per row, "
                                 f"{batch} here; -1 = no user)")
            return None
        if isinstance(user_ids, Tensor):
            ids = user_ids
        else:
            try:
                ids = torch.as_tensor(list(user_ids))
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"user_ids must be an int tensor [batch] or a sequence of ints, one per row "
                                f"(-1 = no user), got {type(user_ids).__name__}: {user_ids!r}") from e
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise TypeError(f"user_ids must be integers, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"user_ids must be 1-D (one user per row), got shape {list(ids.shape)}")
        if ids.shape[0] != batch:
            raise ValueError(f"user_ids has {ids.shape[0]} entries but the batch has {batch} rows: "
                             f"pass one user id per row (-1 = no user)")
        bad = ids[(ids < -1) | (ids >= self.num_users)]
        if bad.numel():
            raise ValueError(f"unknown user id(s) {sorted(set(bad.tolist()))}: the bank has {self.num_users} "
                             f"users (ids 0..{self.num_users - 1}, -1 = no user); add_users(n) grows it")
        return ids.to(device=device, dtype=torch.long)

    def _set_routing(self, routing: Optional[UserRouting]) -> None:
        for _, layer in self.adapted_layers():
            layer.routing = routing

    def clear_routing(self) -> None:
        """Drop the routing left on the layers (kept after a training forward under
        gradient checkpointing, where the backward recomputes the layers)."""
        self._set_routing(None)

    @staticmethod
    def _batch_and_device(input_ids, kwargs) -> Tuple[int, torch.device]:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        return ref.shape[0], ref.device

    def _gc_active(self) -> bool:
        """Whether a backward will recompute the layers (activation checkpointing on,
        training, grad enabled)."""
        m = self._modules["model"]
        gc = getattr(m, "is_activation_checkpointing", None)
        if gc is None:
            gc = getattr(m, "is_gradient_checkpointing", False)
        return bool(gc) and m.training and torch.is_grad_enabled()

    @torch.compiler.disable
    def _prepare_routing(self, input_ids, user_ids, kwargs) -> None:
        """Check ``user_ids`` and set the routing of a forward call on every layer.
        Checks (host syncs) and plan building stay out of any torch.compile graph;
        the plan of the full-sequence shape is built here, once, for all layers."""
        B, dev = self._batch_and_device(input_ids, kwargs)
        ids = self._check_user_ids(user_ids, B, None)  # where the caller has them (a paged bank reads them on the host)
        routing = None
        if ids is not None:
            routing = self._bank_routing(ids, dev)
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
            routing.for_input(ref.new_empty(*ref.shape, 0))
        self._set_routing(routing)

    def _generate_routing(self, input_ids, user_ids, kwargs) -> Optional[UserRouting]:
        """The routing of a generate call: rows expanded by ``num_beams`` /
        ``num_return_sequences`` (as GenerationMixin expands the inputs) keep their
        row's user; plans are built per step shape as the layers ask."""
        B, dev = self._batch_and_device(input_ids, kwargs)
        ids = self._check_user_ids(user_ids, B, None)
        if ids is None:
            return None
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1) or 1)
        nret = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1) or 1)
        expand = max(int(beams), int(nret), 1)
        if expand > 1:
            ids = ids.repeat_interleave(expand)
        return self._bank_routing(ids, dev)

    def _bank_routing(self, ids: Tensor, device) -> UserRouting:
        """The routing of checked user ids: the bank's rows for them (the ids when
        resident; slot ids in [-1, user_cache_size) after paging the users in), on ``device``."""
        rows, num_rows = self.user_bank.route(ids)
        return UserRouting(rows.to(device, non_blocking=True), num_rows)
