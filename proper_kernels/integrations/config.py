"""``ProperConfig``: what :func:`get_proper_model` adapts and how (plain dataclass, JSON)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..ops.dispatch import BACKENDS

__all__ = ["ProperConfig"]


@dataclass
class ProperConfig:
    """Hyper-parameters of a PROPER-adapted causal LM.

    Every ``nn.Linear`` whose attribute name (the last part of its module path) is in
    ``target_modules`` becomes a :class:`proper_kernels.layers.ProperLinear` with:

    * population LoRA of rank ``population_rank`` (stage 1, merged into W0 after),
    * ``num_experts`` group experts of rank ``expert_rank`` with a user-aware router
      (token part if ``router``, user part ``W_e e_u`` with e_u of size
      ``user_embed_dim``) (stage 2),
    * ``num_users`` per-user LoRAs of rank ``user_rank`` and the LoRA-aware router
      ``V_u`` if ``user_router`` (stage 3).

    Scales are ``alpha / rank`` as in LoRA. ``balance_weight`` and
    ``diversity_weight`` weight the group-stage auxiliary losses that
    :meth:`ProperModel.forward` adds to the LM loss when labels are given (they are
    added in the user stage too when ``aux_in_user_stage``; off by default since the
    experts and the token router are frozen there).

    ``user_bank``: where the per-user rows live. ``"resident"`` (default): rows
    0..N-1 of every adapted layer's parameters on the compute device.
    ``"paged"``: every user's rows (and their optimiser state) in host memory and
    ``user_cache_size`` device slots per layer, filled per batch (least recently used
    users leave first); the device memory of the user part is then O(user_cache_size),
    whatever ``num_users`` is. See :mod:`proper_kernels.integrations.paged`.
    """

    target_modules: Tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    num_experts: int = 4
    expert_rank: int = 4
    expert_alpha: float = 8.0
    router: bool = True
    num_users: int = 0
    user_rank: int = 4
    user_alpha: float = 8.0
    user_embed_dim: int = 8
    user_router: bool = True
    top_k: Optional[int] = None
    population_rank: int = 8
    population_alpha: float = 16.0
    balance_weight: float = 0.01
    diversity_weight: float = 0.01
    aux_in_user_stage: bool = False
    backend: str = "auto"
    user_bank: str = "resident"
    user_cache_size: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one nn.Linear attribute")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (or None: $PROPER_KERNELS_BACKEND), "
                             f"got {self.backend!r}")
        for name in ("num_experts", "expert_rank", "num_users", "user_rank", "user_embed_dim", "population_rank",
                     "user_cache_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ProperConfig.{name} must be a non-negative int, got {v!r}")
        if self.num_experts and self.expert_rank < 1:
            raise ValueError("ProperConfig.expert_rank must be >= 1 when num_experts > 0")
        if self.top_k is not None and not (self.num_experts and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"ProperConfig.top_k must be None or in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.balance_weight < 0 or self.diversity_weight < 0:
            raise ValueError("balance_weight and diversity_weight must be >= 0")
        if self.user_bank not in ("resident", "paged"):
            raise ValueError(f"ProperConfig.user_bank must be 'resident' or 'paged', got {self.user_bank!r}")
        if self.user_bank == "paged" and (self.user_cache_size < 1 or self.num_users < 1):
            raise ValueError(f"ProperConfig(user_bank='paged') needs user_cache_size >= 1 (device slots per layer) "
                             f"and num_users >= 1, got user_cache_size={self.user_cache_size}, "
                             f"num_users={self.num_users}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ProperConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ProperConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProperConfig":
        return cls.from_dict(json.loads(text))
