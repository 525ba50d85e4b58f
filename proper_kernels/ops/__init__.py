"""Custom ops, autograd, backend dispatch and the routing plan."""
from . import cuda_decode, fused  # noqa: F401  (register the custom ops; no triton import)
from .mixture import available_backends, choose_backend, lora_mixture
from .plan import RoutingPlan, plan
from .validate import MixtureSpec, check_mixture_args

__all__ = ["lora_mixture", "available_backends", "choose_backend", "RoutingPlan", "plan",
           "MixtureSpec", "check_mixture_args"]
