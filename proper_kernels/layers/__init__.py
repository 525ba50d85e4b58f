"""nn.Modules: the PROPER-adapted linear and the per-batch user routing."""
from .linear import ProperLinear, UserRouting

__all__ = ["ProperLinear", "UserRouting"]
