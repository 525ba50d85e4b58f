"""Drop-in modules: the PROPER-adapted linear and the per-batch user routing."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.mixture import lora_mixture
from ..ops.plan import RoutingPlan
from ..reference.losses import balance_loss, diversity_loss, gate_importance

__all__ = ["UserRouting", "ProperLinear"]


class UserRouting:
    """One user id per row of a batch, shared by every adapted layer of a model.

    Rows are expanded to tokens for whatever sequence length a layer sees (the
    prompt, then one token per decode step) and the routing plan of each length is
    built once and cached, so all layers of a forward pass reuse it. The id range is
    checked once, here.

    Args:
        row_user_ids: int [B], values in [-1, num_users).
        num_users: size of the user bank.
    """

    def __init__(self, row_user_ids: Tensor, num_users: int):
        if not isinstance(row_user_ids, Tensor):
            row_user_ids = torch.as_tensor(row_user_ids)
        if row_user_ids.dim() != 1:
            raise ValueError(f"user_ids must be 1-D [batch] (one user per row), got shape {list(row_user_ids.shape)}")
        RoutingPlan(row_user_ids, num_users)  # range check (raises with the bad values)
        self.row_user_ids = row_user_ids
        self.num_users = num_users
        # The cached plans are of these ids: their version tells an in-place change, or,
        # for an inference tensor (which keeps none), a copy to compare with.
        inference = row_user_ids.is_inference()
        self._version = None if inference else row_user_ids._version
        self._copy = row_user_ids.clone() if inference else None
        self._plans: Dict[tuple, RoutingPlan] = {}

    def _check_unchanged(self) -> None:
        ids, why = self.row_user_ids, ("user_ids were modified in place after the batch's routing was set: "
                                       "build a new UserRouting (the model does so on each call) instead")
        if self._copy is None:
            if ids._version != self._version:
                raise ValueError(why)
        elif ids.device.type == "cuda":
            torch._assert_async((ids == self._copy).all(), why)
        elif not torch.equal(ids, self._copy):
            raise ValueError(why)

    def for_input(self, x: Tensor):
        """(token user ids [...], plan) for x [B, S, d] or [B, d]."""
        B = self.row_user_ids.shape[0]
        if not torch.compiler.is_compiling():
            self._check_unchanged()
        if x.shape[0] != B:
            raise ValueError(f"user_ids has {B} rows but the layer input has batch size {x.shape[0]}")
        lead = tuple(x.shape[:-1])
        key = (lead, x.device)
        if key not in self._plans:
            ids = self.row_user_ids.to(x.device)
            ids = ids.view(B, *([1] * (len(lead) - 1))).expand(lead).contiguous()
            self._plans[key] = (ids, RoutingPlan(ids, self.num_users, check=False))
        return self._plans[key]


def _kaiming(shape, fan_in: int, dtype, device) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT's LoRA A
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)


class ProperLinear(nn.Module):
    """An nn.Linear adapted the PROPER way: population LoRA, gated group experts with a
    user-aware router, per-user LoRA with a LoRA-aware router.

    ``y = W0 x + b + s_p B_p A_p x + lora_mixture(...)``, the mixture of
    :func:`proper_kernels.lora_mixture` with the router's user bias c = W_e e_u.

    Parts are created by the constructor and switched on/off with the ``use_*``
    flags. B matrices and the LoRA-aware router start at zero, so the module's output
    at creation equals the wrapped linear's exactly.

    Args:
        base: the nn.Linear to wrap; its weight and bias are kept (frozen by default).
        num_experts, expert_rank, expert_alpha: K, r and alpha of the group experts
            (num_experts=0: no group level). scale s_g = alpha / r.
        router: learn the token part W_r [K, d_in] of the user-aware router.
        user_embed_dim: d_e of the user embeddings E [N, d_e] read by the router
            through W_e [K, d_e] (0: no user term in the router).
        num_users, user_rank, user_alpha: N, r_u, alpha_u of the user adapters
            (num_users=0 or user_rank=0: no user LoRA).
        user_router: learn the LoRA-aware router V [N, K, r_u].
        population_rank, population_alpha: rank/alpha of the population LoRA (0: none).
        top_k: keep only the top_k gate logits (None: dense softmax, as LoRAMoE).
        freeze_base: set requires_grad False on the wrapped weight and bias.
        backend: passed to lora_mixture ("auto", "reference", "torch", "triton", "cuda"; None:
            $PROPER_KERNELS_BACKEND, else "auto").

    Set by the model: ``routing`` (the batch's user routing) and ``track_diversity``
    (form the diversity loss in forward, where the experts are whole under FSDP2).
    After a forward: ``last_gates`` [..., K] and ``last_diversity`` (or None).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        num_experts: int = 0,
        expert_rank: int = 8,
        expert_alpha: float = 16.0,
        router: bool = True,
        user_embed_dim: int = 0,
        num_users: int = 0,
        user_rank: int = 8,
        user_alpha: float = 16.0,
        user_router: bool = True,
        population_rank: int = 0,
        population_alpha: float = 16.0,
        top_k: Optional[int] = None,
        freeze_base: bool = True,
        backend: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        for name, v in (("num_experts", num_experts), ("expert_rank", expert_rank), ("num_users", num_users),
                        ("user_rank", user_rank), ("user_embed_dim", user_embed_dim),
                        ("population_rank", population_rank)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if num_experts and expert_rank < 1:
            raise ValueError("expert_rank must be >= 1 when num_experts > 0")
        if top_k is not None and not (num_experts and 1 <= top_k <= num_experts):
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}] or None, got {top_k!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        dev = base.weight.device
        dt = dtype or base.weight.dtype
        self._dtype = dtype  # None: W0's
        self.num_experts, self.expert_rank, self.top_k = num_experts, expert_rank, top_k
        self.expert_scale = expert_alpha / expert_rank if num_experts else 1.0
        self.num_users, self.user_rank, self.user_embed_dim = num_users, user_rank, user_embed_dim
        self.user_scale = user_alpha / user_rank if user_rank else 1.0
        self.population_rank = population_rank
        self.population_scale = population_alpha / population_rank if population_rank else 1.0
        self.backend = backend
        d_in, d_out = self.in_features, self.out_features

        self.population_A = self.population_B = None
        if population_rank:
            self.population_A = nn.Parameter(_kaiming((population_rank, d_in), d_in, dt, dev))
            self.population_B = nn.Parameter(torch.zeros(d_out, population_rank, dtype=dt, device=dev))

        self.expert_A = self.expert_B = self.router_weight = None
        self.user_embedding = self.user_embed_proj = None
        if num_experts:
            K, r = num_experts, expert_rank
            self.expert_A = nn.Parameter(_kaiming((K, r, d_in), d_in, dt, dev))
            self.expert_B = nn.Parameter(torch.zeros(K, d_out, r, dtype=dt, device=dev))
            if router:
                self.router_weight = nn.Parameter(_kaiming((K, d_in), d_in, dt, dev))
            if user_embed_dim and num_users:
                self.user_embedding = nn.Parameter(torch.randn(num_users, user_embed_dim, dtype=dt, device=dev) * 0.02)
                self.user_embed_proj = nn.Parameter(_kaiming((K, user_embed_dim), user_embed_dim, dt, dev))

        self.user_A = self.user_B = self.user_router = None
        if num_users and user_rank:
            self.user_A = nn.Parameter(_kaiming((num_users, user_rank, d_in), d_in, dt, dev))
            self.user_B = nn.Parameter(torch.zeros(num_users, d_out, user_rank, dtype=dt, device=dev))
            if user_router and num_experts:
                self.user_router = nn.Parameter(torch.zeros(num_users, num_experts, user_rank, dtype=dt, device=dev))

        self._router_embed_wanted = bool(num_experts and user_embed_dim)
        self._user_router_wanted = bool(num_experts and user_router)
        self.use_population = population_rank > 0
        self.use_experts = num_experts > 0
        self.use_user_bias = self.user_embedding is not None
        self.use_user_lora = self.user_A is not None
        self.use_user_router = self.user_router is not None
        self.routing: Optional[UserRouting] = None  # set by the model wrapper per batch
        self.last_gates: Optional[Tensor] = None
        # The diversity loss of the experts, formed in forward (see ``track_diversity``).
        self.track_diversity = False
        self.last_diversity: Optional[Tensor] = None

    # ------------------------------------------------------------------ forward
    def user_logit_bias(self) -> Optional[Tensor]:
        """c = E W_e^T [N, K]: the user part of the user-aware router."""
        if self.user_embedding is None:
            return None
        return self.user_embedding @ self.user_embed_proj.t()

    def forward(self, x: Tensor, user_ids: Optional[Tensor] = None, plan: Optional[RoutingPlan] = None) -> Tensor:
        """x [..., d_in]; user_ids int [...] (or set ``self.routing``); returns [..., d_out]."""
        if user_ids is None and plan is None and self.routing is not None:
            user_ids, plan = self.routing.for_input(x)
        needs_users = self.use_user_lora or (self.use_experts and self.use_user_bias)
        if needs_users and user_ids is None and plan is None:
            raise ValueError("this layer has user parameters: pass user_ids (int [...] matching x's leading dims)")
        use_e = self.use_experts
        use_u = self.use_user_lora
        y = lora_mixture(
            x, self.weight, self.bias,
            expert_A=self.expert_A if use_e else None,
            expert_B=self.expert_B if use_e else None,
            expert_scale=self.expert_scale,
            router_weight=self.router_weight if use_e else None,
            user_ids=user_ids if (use_u or (use_e and self.use_user_bias)) else None,
            user_logit_bias=self.user_logit_bias() if (use_e and self.use_user_bias) else None,
            user_A=self.user_A if use_u else None,
            user_B=self.user_B if use_u else None,
            user_scale=self.user_scale,
            user_router=self.user_router if (use_e and use_u and self.use_user_router) else None,
            top_k=self.top_k if use_e else None,
            plan=plan if (use_u or (use_e and self.use_user_bias)) else None,
            return_gates=use_e,
            backend=self.backend,
        )
        if use_e:
            y, self.last_gates = y
        else:
            self.last_gates = None
        # The diversity loss reads the experts where they are whole: under FSDP2 only
        # inside forward (its hooks gather them before and shard them after); formed
        # here, its gradient reaches them before FSDP2 reduces this module's gradients.
        self.last_diversity = None
        if use_e and self.track_diversity:
            self.last_diversity = diversity_loss(self.expert_A, self.expert_B)
        if self.use_population and self.population_A is not None:
            pop = F.linear(F.linear(x.to(self.population_A.dtype), self.population_A), self.population_B)
            y = y + (self.population_scale * pop).to(y.dtype)
        return y

    # ------------------------------------------------------------------ losses
    def balance_loss(self, mask: Optional[Tensor] = None) -> Tensor:
        """cv^2 of the per-expert gate mass of the last forward (0 without experts)."""
        if self.last_gates is None:
            return self.weight.new_zeros((), dtype=torch.float32)
        return balance_loss(self.last_gates, mask)

    def gate_importance(self, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        """Per-expert gate mass [K] (fp32) of the last forward's tokens (``mask``
        keeps a subset); None without gates. Summed over ranks, it gives the balance
        loss of the global batch."""
        if self.last_gates is None:
            return None
        return gate_importance(self.last_gates, mask)

    def diversity_loss(self) -> Tensor:
        """Mean overlap of the experts' subspaces (0 without experts): the one the
        last forward formed when ``track_diversity`` is on, else from the current experts."""
        if self.last_diversity is not None:
            return self.last_diversity
        if self.expert_A is None:
            return self.weight.new_zeros((), dtype=torch.float32)
        return diversity_loss(self.expert_A, self.expert_B)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def merge_population(self) -> None:
        """Fold s_p B_p A_p into the base weight and drop the population LoRA. The sum
        is formed in fp32 and rounded once to W0's dtype (not delta, then the sum)."""
        if self.population_A is None:
            return
        delta = self.population_scale * (self.population_B.float() @ self.population_A.float())
        self.weight.copy_(self.weight.float() + delta)
        self.population_A = None
        self.population_B = None
        self.use_population = False

    def _adapter_dtype(self) -> torch.dtype:
        # The dtype of the adapters that exist (they follow module.to(dtype)); else the
        # constructor's ``dtype``, else W0's.
        for name, p in self.named_parameters():
            if name not in ("weight", "bias"):
                return p.dtype
        return self._dtype or self.weight.dtype

    @torch.no_grad()
    def add_users(self, n: int) -> None:
        """Grow the user bank by n users with fresh parameters (B and V at zero)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return
        d_in = self.in_features
        dev, dt = self.weight.device, self._adapter_dtype()

        def grow(p: Optional[nn.Parameter], fresh: Tensor) -> nn.Parameter:
            # A layer built with num_users=0 has no bank yet: the first users create it.
            if p is None:
                return nn.Parameter(fresh)
            return nn.Parameter(torch.cat([p.data, fresh.to(p.dtype)], 0), requires_grad=p.requires_grad)

        if self._router_embed_wanted:
            if self.user_embed_proj is None:
                self.user_embed_proj = nn.Parameter(
                    _kaiming((self.num_experts, self.user_embed_dim), self.user_embed_dim, dt, dev))
            self.user_embedding = grow(self.user_embedding, torch.randn(n, self.user_embed_dim, device=dev, dtype=dt) * 0.02)
        if self.user_rank:
            self.user_A = grow(self.user_A, _kaiming((n, self.user_rank, d_in), d_in, dt, dev))
            self.user_B = grow(self.user_B, torch.zeros(n, self.out_features, self.user_rank, device=dev, dtype=dt))
            if self._user_router_wanted:
                self.user_router = grow(self.user_router, torch.zeros(n, self.num_experts, self.user_rank, device=dev, dtype=dt))
        self.use_user_bias = self.use_user_bias or (self.num_users == 0 and self.user_embedding is not None)
        self.use_user_lora = self.use_user_lora or (self.num_users == 0 and self.user_A is not None)
        self.use_user_router = self.use_user_router or (self.num_users == 0 and self.user_router is not None)
        self.num_users += n

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}x"
                f"r{self.expert_rank}, users={self.num_users}x r{self.user_rank}, top_k={self.top_k}, "
                f"population_rank={self.population_rank}")
