"""``ProperModel``: a Hugging Face causal LM with PROPER-adapted linears, and the
three-stage pipeline (population -> group -> user).

Nothing here imports transformers: the wrapped model is any ``nn.Module`` whose
targeted projections are ``nn.Linear`` and whose forward returns an object with
``.loss`` / ``.logits`` (every HF causal LM). peft is imported only by the PEFT
import/export functions (:mod:`proper_kernels.integrations.peft_io`).

Usage::

    pm = get_proper_model(model, ProperConfig(num_users=100))
    pm.set_stage("population"); train(pm)          # one shared LoRA
    pm.set_stage("group");      train(pm)          # merges it, trains experts + router + e_u
    pm.set_stage("user");       train(pm)          # e_u, A_u, B_u, V_u of every user
    pm.generate(input_ids, attention_mask=m, user_ids=[3, 7, -1], max_new_tokens=20)
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..layers.linear import ProperLinear, UserRouting
from .config import ProperConfig

__all__ = ["ProperModel", "get_proper_model", "STAGES", "CONFIG_NAME", "WEIGHTS_NAME"]

STAGES = ("population", "group", "user")
CONFIG_NAME = "proper_config.json"
WEIGHTS_NAME = "proper_adapter.safetensors"
FORMAT = "proper-kernels/1"

# Which ProperLinear parameters belong to which stage.
POPULATION_PARAMS = ("population_A", "population_B")
GROUP_PARAMS = ("expert_A", "expert_B", "router_weight", "user_embed_proj")
USER_PARAMS = ("user_embedding", "user_A", "user_B", "user_router")  # banked: row u is user u
ADAPTER_PARAMS = POPULATION_PARAMS + GROUP_PARAMS + USER_PARAMS
# What each stage trains (the user embedding row is per-user, but the group stage
# trains it too: the user-aware router cannot route users without it).
TRAINABLE = {
    "population": POPULATION_PARAMS,
    "group": GROUP_PARAMS + ("user_embedding",),
    "user": USER_PARAMS,
}

UserIds = Union[Tensor, Sequence[int]]


def _find_targets(model: nn.Module, targets: Tuple[str, ...]) -> List[Tuple[str, nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if attr in targets and isinstance(child, nn.Linear):
                full = f"{name}.{attr}" if name else attr
                found.append((full, module, attr, child))
    return found


def get_proper_model(model: nn.Module, config: Optional[ProperConfig] = None) -> "ProperModel":
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place by
    :class:`ProperLinear` and wrap it.

    Every parameter of ``model`` is frozen. No stage is active at creation (every
    adapter part is switched off), so the logits are exactly the base model's; call
    :meth:`ProperModel.set_stage` to start training.

    Args:
        model: a causal LM (any architecture whose targeted projections are nn.Linear:
            Llama, Qwen2, Mistral, ...). Modified in place.
        config: :class:`ProperConfig` (default: ``ProperConfig()``).
    """
    config = config or ProperConfig()
    return ProperModel(model, config)


class ProperModel(nn.Module):
    """A causal LM whose targeted linears are :class:`ProperLinear`.

    ``forward(..., user_ids=[B])`` / ``generate(..., user_ids=[B])`` take one user id
    per row (-1: no user, population/group parts only). The routing of the batch is
    built once per call and shared by every adapted layer.

    Attributes:
        model: the wrapped (modified in place) causal LM.
        proper_config: a copy of the :class:`ProperConfig`; ``num_users`` tracks the bank size.
        stage: None (nothing active), "population", "group" or "user".
        population_merged: whether the population LoRA was folded into W0.
    """

    def __init__(self, model: nn.Module, config: ProperConfig):
        super().__init__()
        self.model = model
        self.proper_config = copy.deepcopy(config)  # add_users / PEFT import update it: not the caller's
        self.stage: Optional[str] = None
        self.stages_done: List[str] = []
        self.population_merged = False
        # Population LoRA factors kept after merging (for save/load and PEFT export).
        self._merged_population: Dict[str, Tuple[Tensor, Tensor]] = {}
        self.last_aux_losses: Dict[str, Tensor] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = _find_targets(model, config.target_modules)
        if not targets:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"no nn.Linear named any of {list(config.target_modules)} in {type(model).__name__}; "
                f"its nn.Linear names are {linears}"
            )
        self.layer_names: List[str] = []
        for full, parent, attr, lin in targets:
            layer = ProperLinear(
                lin,
                num_experts=config.num_experts, expert_rank=config.expert_rank, expert_alpha=config.expert_alpha,
                router=config.router, user_embed_dim=config.user_embed_dim, num_users=config.num_users,
                user_rank=config.user_rank, user_alpha=config.user_alpha, user_router=config.user_router,
                population_rank=config.population_rank, population_alpha=config.population_alpha,
                top_k=config.top_k, freeze_base=True,
                backend=None if config.backend == "auto" else config.backend,
            )
            setattr(parent, attr, layer)
            self.layer_names.append(full)
        self._apply_stage_flags(None)
        # Older torch (our floor is 2.4) may have only the private names, which take the
        # same hooks.
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(ProperModel._drop_tied_keys)
        else:  # pragma: no cover - older torch
            self._register_state_dict_hook(ProperModel._drop_tied_keys)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(ProperModel._fill_tied_keys)
        else:  # pragma: no cover - older torch
            self._register_load_state_dict_pre_hook(ProperModel._fill_tied_keys, with_module=True)

    # ------------------------------------------------------------------ tied weights
    # state_dict() holds one entry per tied parameter (an lm_head tied to the input
    # embedding: the first name, as HF saves it), so safetensors (and the HF Trainer's
    # checkpoints of this non-PreTrainedModel) can save it; load_state_dict() fills the
    # other names back in, so a strict load of it works.
    def _tied_names(self) -> List[List[str]]:
        names: Dict[int, List[str]] = {}
        for n, p in self.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        return [ns for ns in names.values() if len(ns) > 1]

    @staticmethod
    def _drop_tied_keys(module, state_dict, prefix, local_metadata) -> None:
        for names in module._tied_names():
            for n in names[1:]:
                state_dict.pop(prefix + n, None)

    @staticmethod
    def _fill_tied_keys(module, state_dict, prefix, *args) -> None:
        for names in module._tied_names():
            have = [prefix + n for n in names if prefix + n in state_dict]
            for n in names:
                if have and prefix + n not in state_dict:
                    state_dict[prefix + n] = state_dict[have[0]]

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
        return self.proper_config.num_users

    # ------------------------------------------------------------------ stages
    def _apply_stage_flags(self, stage: Optional[str]) -> None:
        trainable = set(TRAINABLE.get(stage, ()))
        for _, layer in self.adapted_layers():
            layer.use_population = stage == "population" and layer.population_A is not None
            has_e = layer.expert_A is not None
            layer.use_experts = stage in ("group", "user") and has_e
            layer.use_user_bias = stage in ("group", "user") and layer.user_embedding is not None
            layer.use_user_lora = stage == "user" and layer.user_A is not None
            layer.use_user_router = stage == "user" and layer.user_router is not None
            for pname in ADAPTER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    p.requires_grad_(pname in trainable)

    def set_stage(self, stage: str) -> "ProperModel":
        """Switch what exists and what trains.

        * ``"population"``: the population LoRA only (A_p, B_p trainable).
        * ``"group"``: merges the population LoRA into W0 first (once), then experts,
          token router W_r, W_e and the user embeddings E train; the balance and
          diversity losses are added to the LM loss when labels are given.
        * ``"user"``: everything on; only the per-user parts (E rows, A_u, B_u, V_u)
          train. Requires the group stage first (when the config has experts).

        Everything else (the base model included) stays frozen. Returns self.
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
                raise RuntimeError("user stage before group stage: call set_stage('group') and train the "
                                   "group level first (the user stage freezes the experts and the router)")
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

    def _shared_weights(self) -> set:
        """ids of the adapted layers' W0 that more than one place of the model holds."""
        seen: Dict[int, int] = {}
        for _, p in self._modules["model"].named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        return {id(layer.weight) for _, layer in self.adapted_layers() if seen.get(id(layer.weight), 0) > 1}

    def add_users(self, n: int) -> List[int]:
        """Grow the user bank by ``n`` users with fresh parameters (B_u, V_u at zero, so
        a new user starts at the group-level output). Returns the new ids.

        Replaces the banked Parameters: build the optimizer after calling this.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        start = self.proper_config.num_users
        for _, layer in self.adapted_layers():
            layer.add_users(n)
        self.proper_config.num_users = start + n
        self._apply_stage_flags(self.stage)
        return list(range(start, start + n))

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ------------------------------------------------------------------ per-user state
    def _user_index(self, users: UserIds) -> Tensor:
        ids = torch.as_tensor(users if not isinstance(users, int) else [users]).reshape(-1).long()
        bad = ids[(ids < 0) | (ids >= self.num_users)]
        if bad.numel():
            raise ValueError(f"unknown user id(s) {bad.tolist()}: the bank has {self.num_users} users "
                             f"(ids 0..{self.num_users - 1})")
        return ids

    def get_user_state(self, users: UserIds) -> Dict[str, Tensor]:
        """Copies of the per-user parameters of ``users`` (rows stacked in that order):
        ``{"<layer>.<param>": tensor[len(users), ...]}``. For early stopping keep the
        best one and write it back with :meth:`set_user_state`."""
        idx = self._user_index(users)
        out = {}
        for name, layer in self.adapted_layers():
            for pname in USER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    out[f"{name}.{pname}"] = p.detach()[idx.to(p.device)].clone()
        return out

    @torch.no_grad()
    def set_user_state(self, state: Dict[str, Tensor], users: UserIds) -> None:
        """Write rows from :meth:`get_user_state` into the bank at ids ``users``.
        Everything is checked first: on an error nothing is written."""
        idx = self._user_index(users)
        writes = []
        for name, layer in self.adapted_layers():
            for pname in USER_PARAMS:
                p = getattr(layer, pname)
                if p is None:
                    continue
                key = f"{name}.{pname}"
                if key not in state:
                    raise KeyError(f"user state lacks {key!r}")
                src = state[key]
                if src.shape[0] != idx.numel() or tuple(src.shape[1:]) != tuple(p.shape[1:]):
                    raise ValueError(f"{key}: got shape {list(src.shape)}, expected [{idx.numel()}, "
                                     f"{', '.join(map(str, p.shape[1:]))}] (ranks/dims must match the bank)")
                writes.append((key, p, src))
        extra = sorted(set(state) - {key for key, _, _ in writes})
        if extra:
            raise ValueError(f"user state has entries this model does not have: {extra[:4]}")
        for _, p, src in writes:
            p[idx.to(p.device)] = src.to(device=p.device, dtype=p.dtype)

    def freeze_users(self, users: UserIds, state: Optional[Dict[str, Tensor]] = None) -> None:
        """Per-user early stopping: pin the parameters of ``users``.

        Remembers their current rows (or, with ``state`` from :meth:`get_user_state`
        of these ``users`` in this order, writes those rows first, e.g. the best
        snapshot so far, and pins them). :meth:`restore_frozen_users` (call it after
        each optimizer step) writes the pinned rows back, so they stay fixed whatever
        the optimizer (momentum, weight decay) does. Freezing a frozen user again
        re-pins it at the new values. Only the per-user rows are stored, never the
        shared parameters."""
        idx = self._user_index(users).tolist()
        if state is not None:
            self.set_user_state(state, idx)
        if not idx:
            return
        frozen = self._frozen_rows()
        snap = self.get_user_state(idx)
        for i, u in enumerate(idx):
            frozen[u] = {k: v[i:i + 1] for k, v in snap.items()}
        self._frozen_stack = None

    def unfreeze_users(self, users: Optional[UserIds] = None) -> None:
        """Let ``users`` (default: every frozen user) train again; their current
        rows are kept."""
        frozen = self._frozen_rows()
        if users is None:
            frozen.clear()
        else:
            for u in self._user_index(users).tolist():
                frozen.pop(u, None)
        self._frozen_stack = None

    @property
    def frozen_users(self) -> List[int]:
        """Ids of the users pinned by :meth:`freeze_users`, ascending."""
        return sorted(self._frozen_rows())

    def _frozen_rows(self) -> Dict[int, Dict[str, Tensor]]:
        frozen = self.__dict__.get("_frozen")
        if frozen is None:
            frozen = self.__dict__["_frozen"] = {}
        return frozen

    @torch.no_grad()
    def restore_frozen_users(self) -> None:
        """Write the pinned rows of every frozen user back (one indexed write per
        bank tensor, however many users are frozen)."""
        frozen = self._frozen_rows()
        if not frozen:
            return
        stack = self.__dict__.get("_frozen_stack")
        if stack is None:
            ids = sorted(frozen)
            state = {k: torch.cat([frozen[u][k] for u in ids], 0) for k in frozen[ids[0]]}
            stack = self.__dict__["_frozen_stack"] = (ids, state)
        self.set_user_state(stack[1], stack[0])

    # ------------------------------------------------------------------ routing
    def _needs_users(self) -> bool:
        for _, layer in self.adapted_layers():
            if layer.use_user_lora or (layer.use_experts and layer.use_user_bias):
                return True
        return False

    def _check_user_ids(self, user_ids: Optional[UserIds], batch: int, device) -> Optional[Tensor]:
        if user_ids is None:
            if self._needs_users():
                raise ValueError(f"stage {self.stage!r} has user parameters: pass user_ids (one id per row, "
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
        m = self._modules["model"]
        gc = getattr(m, "is_activation_checkpointing", None)
        if gc is None:
            gc = getattr(m, "is_gradient_checkpointing", False)
        return bool(gc) and m.training and torch.is_grad_enabled()

    @torch.compiler.disable
    def _prepare_routing(self, input_ids, user_ids, kwargs) -> None:
        # Checks (host syncs) and plan building stay out of any torch.compile graph;
        # the plan of the full-sequence shape is built here, once, for all layers.
        B, dev = self._batch_and_device(input_ids, kwargs)
        ids = self._check_user_ids(user_ids, B, dev)
        routing = None
        if ids is not None:
            routing = UserRouting(ids, self.num_users)
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
            routing.for_input(ref.new_empty(*ref.shape, 0))
        self._set_routing(routing)

    # ------------------------------------------------------------------ forward
    def aux_loss(self, attention_mask: Optional[Tensor] = None) -> Tensor:
        """balance_weight * mean_layers balance(last gates) + diversity_weight *
        mean_layers diversity(experts), from the last forward. Also stored in
        ``last_aux_losses``."""
        cfg = self.proper_config
        bal, div, n = 0.0, 0.0, 0
        for _, layer in self.adapted_layers():
            if not layer.use_experts:
                continue
            mask = None
            g = layer.last_gates
            if attention_mask is not None and g is not None and tuple(g.shape[:-1]) == tuple(attention_mask.shape):
                mask = attention_mask.bool()
            if cfg.balance_weight:
                bal = bal + layer.balance_loss(mask)
            if cfg.diversity_weight:
                div = div + layer.diversity_loss()
            n += 1
        if n == 0:
            zero = torch.zeros(())
            self.last_aux_losses = {"balance": zero, "diversity": zero}
            return zero
        bal, div = torch.as_tensor(bal) / n, torch.as_tensor(div) / n
        self.last_aux_losses = {"balance": bal.detach(), "diversity": div.detach()}
        return cfg.balance_weight * bal + cfg.diversity_weight * div

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
            cfg = self.proper_config
            add_aux = self.stage == "group" or (self.stage == "user" and cfg.aux_in_user_stage)
            if labels is not None and add_aux and (cfg.balance_weight or cfg.diversity_weight):
                if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
                    if out and isinstance(out[0], Tensor) and out[0].dim() == 0:
                        out = (out[0] + self.aux_loss(attention_mask).to(out[0].device, out[0].dtype),) + out[1:]
                else:
                    loss = getattr(out, "loss", None)
                    if loss is not None:
                        out.loss = loss + self.aux_loss(attention_mask).to(loss.device, loss.dtype)
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
        B, dev = self._batch_and_device(input_ids, kwargs)
        ids = self._check_user_ids(user_ids, B, dev)
        routing = None
        if ids is not None:
            gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1) or 1)
            nret = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1) or 1)
            expand = max(int(beams), int(nret), 1)  # as GenerationMixin expands the inputs
            if expand > 1:
                ids = ids.repeat_interleave(expand)
            routing = UserRouting(ids, self.num_users)
        self._set_routing(routing)
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

    # ------------------------------------------------------------------ persistence
    def _state_json(self, users: Optional[List[int]]) -> dict:
        return {
            "format": FORMAT,
            "config": self.proper_config.to_dict(),
            "stage": self.stage,
            "stages_done": list(self.stages_done),
            "population_merged": self.population_merged,
            "layers": list(self.layer_names),
            "users": users,
            # Per-user early stopping survives a full save: these are pinned again on load.
            "frozen_users": self.frozen_users if users is None else [],
        }

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        """Every adapter tensor: ``<layer>.<param>`` plus ``<layer>.merged_population_A/B``
        (the factors of a merged population LoRA, re-merged on load)."""
        out = {}
        for name, layer in self.adapted_layers():
            for pname in ADAPTER_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    out[f"{name}.{pname}"] = p.detach()
            if name in self._merged_population:
                A, B = self._merged_population[name]
                out[f"{name}.merged_population_A"] = A
                out[f"{name}.merged_population_B"] = B
        return out

    def save_pretrained(self, save_directory: str, users: Optional[UserIds] = None) -> None:
        """Write ``proper_config.json`` + ``proper_adapter.safetensors`` (adapters only,
        never the base weights).

        ``users=None``: everything (shared parts and the whole bank), reloaded
        bit-exactly by :meth:`from_pretrained` on the same base model, which also pins
        the users frozen here (:meth:`freeze_users`) again, at their saved rows.
        ``users=[...]``: only those users' rows (e_u, A_u, B_u, V_u of every layer),
        nothing shared: for privacy and size; load it with :meth:`load_users`.
        """
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        if users is None:
            tensors = self.adapter_state_dict()
            ulist = None
        else:
            ulist = self._user_index(users).tolist()
            tensors = self.get_user_state(ulist)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": FORMAT})
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self._state_json(ulist), f, indent=2)

    @staticmethod
    def _read(directory: str) -> Tuple[dict, Dict[str, Tensor]]:
        from safetensors.torch import load_file

        cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
            raise FileNotFoundError(f"{directory} is not a ProperModel directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        with open(cpath) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cpath}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
        return meta, load_file(wpath)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str) -> "ProperModel":
        """Rebuild a ProperModel saved with ``save_pretrained(dir)`` on ``base_model``
        (the same, unmodified base the adapters were trained on). Bit-exact."""
        meta, tensors = cls._read(directory)
        if meta.get("users") is not None:
            raise ValueError(f"{directory} holds only users {meta['users']} (a user subset); load it into an "
                             f"existing ProperModel with load_users()")
        cfg = ProperConfig.from_dict(meta["config"])
        pm = cls(base_model, cfg)
        if list(pm.layer_names) != list(meta["layers"]):
            raise ValueError("the base model's targeted layers differ from the saved ones: "
                             f"{len(pm.layer_names)} vs {len(meta['layers'])} layers")
        with torch.no_grad():
            used = set()
            for name, layer in pm.adapted_layers():
                ka, kb = f"{name}.merged_population_A", f"{name}.merged_population_B"
                if ka in tensors:
                    layer.population_A.copy_(tensors[ka])
                    layer.population_B.copy_(tensors[kb])
                    used.update((ka, kb))
            if meta["population_merged"]:
                pm.merge_population()
            for name, layer in pm.adapted_layers():
                for pname in ADAPTER_PARAMS:
                    p = getattr(layer, pname)
                    key = f"{name}.{pname}"
                    if p is None:
                        continue
                    if key not in tensors:
                        raise ValueError(f"{directory}: missing tensor {key!r}")
                    if tuple(tensors[key].shape) != tuple(p.shape):
                        raise ValueError(f"{key}: saved shape {list(tensors[key].shape)} != {list(p.shape)}")
                    p.copy_(tensors[key])
                    used.add(key)
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"{directory}: unexpected tensors {extra[:4]}")
        pm.stages_done = list(meta["stages_done"])
        pm.stage = meta["stage"]
        pm._apply_stage_flags(pm.stage)
        pm.freeze_users(meta.get("frozen_users", []))  # saves before this field had none
        return pm

    def load_users(self, directory: str, at: Optional[UserIds] = None) -> List[int]:
        """Load a user subset saved with ``save_pretrained(dir, users=[...])`` into
        this bank at ids ``at`` (default: the saved ids). Grow the bank with
        :meth:`add_users` first when the ids do not exist yet. The saved user rank and
        scale (``user_rank``, ``user_alpha``), ``user_embed_dim``, ``user_router``,
        ``num_experts`` and targets must be this model's. Returns the ids."""
        meta, tensors = self._read(directory)
        saved = meta.get("users")
        if saved is None:
            raise ValueError(f"{directory} is a full save, not a user subset: use ProperModel.from_pretrained")
        at = saved if at is None else (self._user_index(at).tolist())
        if len(at) != len(saved):
            raise ValueError(f"{directory} holds {len(saved)} users but {len(at)} target ids were given")
        cfg = ProperConfig.from_dict(meta["config"])
        mine = self.proper_config
        for f in ("user_rank", "user_alpha", "user_embed_dim", "user_router", "num_experts", "target_modules"):
            if getattr(cfg, f) != getattr(mine, f):
                raise ValueError(f"{directory}: {f}={getattr(cfg, f)!r} does not match this model's {getattr(mine, f)!r}")
        self.set_user_state(tensors, at)
        return list(at)

    # ------------------------------------------------------------------ PEFT
    def load_peft_adapter(self, peft_dir: str, *, user: Optional[int] = None) -> None:
        """Import a PEFT LoRA directory as the population LoRA (``user=None``; before
        merging) or as user ``user``'s adapter (A_u, B_u; B rescaled by
        s_peft / s_u). Ranks must match. See :mod:`.peft_io`."""
        from .peft_io import load_peft_adapter

        load_peft_adapter(self, peft_dir, user=user)

    def export_peft_user(self, save_directory: str, user: int, *, include_population: bool = True) -> None:
        """Write user ``user``'s LoRA as a PEFT LoRA directory. See :mod:`.peft_io`."""
        from .peft_io import export_peft_user

        export_peft_user(self, save_directory, user, include_population=include_population)
