"""Custom ops, autograd, the path decision and the routing plan."""
from . import autograd, cuda_decode  # noqa: F401  (register the custom ops; no triton import)
from .dispatch import BACKENDS, Path, available_backends, choose_path, explain
from .mixture import lora_mixture
from .plan import RoutingPlan, plan
from .validate import MixtureSpec, check_mixture_args

__all__ = ["lora_mixture", "explain", "Path", "BACKENDS", "available_backends", "choose_path", "RoutingPlan",
           "plan", "MixtureSpec", "check_mixture_args"]
