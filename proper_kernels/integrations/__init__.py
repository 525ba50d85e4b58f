"""Hugging Face integration: the only place that imports transformers and peft,
and only lazily (importing ``proper_kernels`` or this package imports neither).

    from proper_kernels.integrations import ProperConfig, get_proper_model
    pm = get_proper_model(hf_causal_lm, ProperConfig(num_users=100))
"""
from .config import ProperConfig

__all__ = ["ProperConfig", "get_proper_model", "ProperModel", "UserShardSampler", "fully_shard_model",
           "set_balance_group"]


def __getattr__(name):
    if name in ("get_proper_model", "ProperModel"):
        from . import model

        return getattr(model, name)
    if name in ("UserShardSampler", "fully_shard_model", "set_balance_group"):
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
