"""ProperModel as a whole (proper_kernels.integrations.model) on tiny random Llama /
Qwen2 / Mistral models (CPU): lazy imports and the package's import layering, the
identity at creation, attribute passthrough, the HF Trainer, and the caller's config
left alone."""
import ast
import copy
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import proper_kernels.integrations as integrations  # noqa: E402
from proper_kernels.integrations import get_proper_model  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    collate_lm, counting_corpus, left_pad, random_peft_lora, random_token_seqs, tiny_causal_lm, tiny_proper_config,
    tiny_training_args)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------- imports
def test_import_is_lazy():
    code = ("import sys, proper_kernels, proper_kernels.integrations as I; "
            "I.ProperModel, I.get_proper_model, I.ProperConfig; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'eager import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def _package_imports():
    """{module: set of modules of the integrations package it imports (at any depth of its code)}."""
    root = os.path.dirname(integrations.__file__)
    mods = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(root, m + ".py")).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proper_kernels.integrations."):
                deps.add(node.module.rsplit(".", 1)[-1])
        graph[m] = deps & mods
    return graph


def test_package_modules_import_only_downward():
    graph = _package_imports()
    assert graph["peft_io"] == set(), graph["peft_io"]
    assert graph["config"] == set(), graph["config"]
    order = []  # a topological order exists only without a cycle
    todo = dict(graph)
    while todo:
        ready = sorted(m for m, deps in todo.items() if deps <= set(order))
        assert ready, f"import cycle among {sorted(todo)}: {todo}"
        order += ready
        for m in ready:
            del todo[m]
    assert order.index("model") > max(order.index(m) for m in ("stages", "user_bank", "persistence"))


# ---------------------------------------------------------------------- creation
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_identity_at_creation_and_each_stage(arch):
    base = tiny_causal_lm(arch)
    ref = copy.deepcopy(base)
    pm = get_proper_model(base, tiny_proper_config())
    assert len(pm.layer_names) == 2 * 3
    ids, mask, pos = left_pad(random_token_seqs([5, 9, 7]))
    want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(got, want)
    for stage in ("population", "group", "user"):  # B and V start at zero: still the base output
        pm.set_stage(stage)
        got = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=[0, 3, -1]).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_no_target_found_is_clear():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        get_proper_model(tiny_causal_lm(), tiny_proper_config(target_modules=("fc1",)))


def test_a_target_name_that_matches_no_linear_is_refused_with_the_valid_names():
    base = tiny_causal_lm()
    valid = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    for targets in (("q_proj", "bogus"), ("q_proj", "mlp")):  # a typo; a module that is not an nn.Linear
        with pytest.raises(ValueError, match=rf"no nn.Linear named \['{targets[1]}'\] .*names are {re.escape(valid)}"):
            get_proper_model(base, tiny_proper_config(target_modules=targets))
    assert isinstance(base.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # refused before any change
    assert all(p.requires_grad for p in base.parameters())


def test_attributes_pass_through_to_the_wrapped_model():
    base = tiny_causal_lm()
    pm = get_proper_model(base, tiny_proper_config())
    assert pm.model is base
    assert pm.config is base.config and pm.generation_config is base.generation_config
    assert [n for n, _ in pm.adapted_layers()] == pm.layer_names
    assert all(p.requires_grad is False for p in base.parameters())
    with pytest.raises(AttributeError):
        pm.no_such_attribute


def test_the_callers_config_is_not_mutated(tmp_path):
    pytest.importorskip("peft")
    cfg = tiny_proper_config(population_rank=5)
    pm = get_proper_model(tiny_causal_lm(), cfg)
    pm.add_users(2)
    random_peft_lora(tiny_causal_lm(), 5, 8, ["up_proj"], use_rslora=True).save_pretrained(tmp_path)
    pm.load_peft_adapter(tmp_path)  # sets the population scale to PEFT's
    assert pm.num_users == 6 and pm.proper_config.population_alpha != 16.0
    assert cfg == tiny_proper_config(population_rank=5)  # the caller's object: what it was
    assert get_proper_model(tiny_causal_lm(), cfg).num_users == 4


# ---------------------------------------------------------------------- training
def test_trainer_lowers_loss(tmp_path):
    from transformers import Trainer

    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config(num_users=2, balance_weight=0.01, diversity_weight=0.01))
    pm.set_stage("group")
    data = counting_corpus()

    def eval_loss():
        with torch.no_grad():
            return pm(**collate_lm(data)).loss.item()

    before = eval_loss()
    args = tiny_training_args(tmp_path, max_steps=12, learning_rate=5e-2, lr_scheduler_type="constant")
    Trainer(model=pm, args=args, train_dataset=data, data_collator=collate_lm).train()
    after = eval_loss()
    assert after < before - 0.1, (before, after)
