"""proper-kernels: fused kernels for PROPER-style personalised LoRA mixtures.

    y = proper_kernels.lora_mixture(x, W0, b, expert_A=..., expert_B=..., router_weight=...,
                                    user_ids=ids, user_A=..., user_B=..., user_router=...)
"""
from .ops import Path, RoutingPlan, available_backends, explain, lora_mixture, plan
from .reference import Adapters, balance_loss, diversity_loss, lora_mixture_ref

__version__ = "0.1.0"

__all__ = ["lora_mixture", "lora_mixture_ref", "Adapters", "explain", "Path", "plan", "RoutingPlan", "available_backends",
           "balance_loss", "diversity_loss", "__version__"]
