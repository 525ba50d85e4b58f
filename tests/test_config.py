"""ProperConfig (proper_kernels.integrations.config): JSON round trip and the checks of
its fields. Needs neither transformers nor peft."""
import pytest

from proper_kernels.integrations import ProperConfig
from proper_kernels.testing import tiny_proper_config


def test_config_json_roundtrip():
    cfg = tiny_proper_config(top_k=2, target_modules=["up_proj"])
    assert cfg.target_modules == ("up_proj",)
    assert ProperConfig.from_json(cfg.to_json()) == cfg
    assert ProperConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ProperConfig fields"):
        ProperConfig.from_dict({"nope": 1})


def test_a_single_target_name_is_a_tuple():
    assert ProperConfig(target_modules="down_proj").target_modules == ("down_proj",)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(num_experts=0, top_k=1), "top_k"),
    (dict(target_modules=()), "target_modules"),
    (dict(num_users=-1), "num_users must be a non-negative int"),
    (dict(user_rank=2.0), "user_rank must be a non-negative int"),
    (dict(num_experts=True), "num_experts must be a non-negative int"),
    (dict(num_experts=2, expert_rank=0), "expert_rank must be >= 1"),
    (dict(balance_weight=-0.1), "balance_weight"),
    (dict(backend="tritonn"), r"backend must be one of \('auto', 'reference', 'torch', 'triton', 'cuda'\)"),
])
def test_bad_fields_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProperConfig(**kwargs)
