"""The adapter tensors of one PROPER-adapted linear, as one named value.

:class:`Adapters` is what every layer of the package passes around: the public op
builds it from its keywords, validation reads it, the reference computes from it, the
launchers and the CUDA wrapper unpack it. Only the ``torch.library`` custom ops take
the tensors flat (their schema has no room for a tuple of optional tensors); they
rebuild it with :meth:`Adapters.from_flat`.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Adapters", "ADAPTER_TENSORS"]

# The tensor fields of Adapters, in their order (the order of every flat form).
ADAPTER_TENSORS = ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router")


class Adapters(NamedTuple):
    """Everything of one layer beyond the base linear; every field optional.

    Attributes:
        expert_A:        A_g [K, r, d_in], the group experts' down projections.
        expert_B:        B_g [K, d_out, r], their up projections.
        router_weight:   W_r [K, d_in], the token part of the user-aware router.
        user_logit_bias: c [N, K] (= W_e E^T), the user part of that router.
        user_A:          A_u [N, r_u, d_in], the user adapters' down projections.
        user_B:          B_u [N, d_out, r_u], their up projections.
        user_router:     V [N, K, r_u], the LoRA-aware router.
        expert_scale:    s_g (python float).
        user_scale:      s_u (python float).
        top_k:           None (dense softmax) or the number of logits kept, in [1, K].

    The formula they enter is :func:`proper_kernels.reference.lora_mixture_ref_loop`.
    """

    expert_A: Optional[Tensor] = None
    expert_B: Optional[Tensor] = None
    router_weight: Optional[Tensor] = None
    user_logit_bias: Optional[Tensor] = None
    user_A: Optional[Tensor] = None
    user_B: Optional[Tensor] = None
    user_router: Optional[Tensor] = None
    expert_scale: float = 1.0
    user_scale: float = 1.0
    top_k: Optional[int] = None

    @classmethod
    def from_kwargs(cls, mapping: Mapping[str, object]) -> "Adapters":
        """The fields found in ``mapping`` (e.g. :func:`proper_kernels.testing.make_mixture_inputs`);
        other keys are ignored."""
        return cls(**{k: mapping[k] for k in cls._fields if k in mapping})

    @classmethod
    def from_flat(cls, tensors, expert_scale: float = 1.0, user_scale: float = 1.0,
                  top_k: Optional[int] = None) -> "Adapters":
        """From the 7 tensors in :data:`ADAPTER_TENSORS` order (a custom op's arguments)."""
        return cls(*tensors, expert_scale=expert_scale, user_scale=user_scale, top_k=top_k)

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        """The 7 tensors in :data:`ADAPTER_TENSORS` order."""
        return tuple(self)[: len(ADAPTER_TENSORS)]

    def to(self, dtype: torch.dtype) -> "Adapters":
        """Every present tensor converted to ``dtype`` (scales and top_k unchanged)."""
        return self._replace(**{k: getattr(self, k).to(dtype) for k in ADAPTER_TENSORS
                                if getattr(self, k) is not None})

    @property
    def num_experts(self) -> int:
        """K (0 without experts)."""
        return self.expert_A.shape[0] if self.expert_A is not None else 0

    @property
    def expert_rank(self) -> int:
        """r (0 without experts)."""
        return self.expert_A.shape[1] if self.expert_A is not None else 0

    @property
    def user_rank(self) -> int:
        """r_u (0 without user adapters)."""
        return self.user_A.shape[1] if self.user_A is not None else 0

    @property
    def num_users(self) -> Optional[int]:
        """N from the first user-indexed tensor, None when there is none."""
        for t in (self.user_logit_bias, self.user_A, self.user_B, self.user_router):
            if t is not None:
                return t.shape[0]
        return None

    @property
    def has_user_terms(self) -> bool:
        """Whether any tensor is indexed by user."""
        return self.num_users is not None

    def is_empty(self) -> bool:
        """No adapter tensor at all: the layer is its base linear."""
        return all(t is None for t in self.tensors())
