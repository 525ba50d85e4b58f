"""PEFT LoRA directories in and out of ProperModel (proper_kernels.integrations.peft_io),
checked against peft itself on tiny random Llama models (CPU): import as the
population LoRA or as one user's adapter, export of a user that PeftModel loads, scales
that survive a save/load bit-exactly, and the adapters that cannot be imported."""
import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    random_peft_lora, random_token_seqs, randomize_adapters, tiny_causal_lm, tiny_proper_config, trained_proper_model)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_peft_import_population_and_user(tmp_path):
    orig = tiny_causal_lm()
    pmodel = random_peft_lora(copy.deepcopy(orig), r=4, alpha=4)
    pmodel.save_pretrained(tmp_path / "peft")
    ids = torch.tensor(random_token_seqs([7, 7]))
    with torch.no_grad():
        want = pmodel(input_ids=ids).logits

    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=4))
    pm.set_stage("population")
    pm.load_peft_adapter(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    # as user 2's adapter (different alpha: B is rescaled), experts off
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=0, user_rank=4))
    pm.set_stage("group")
    pm.set_stage("user")
    others = pm.get_user_state([0, 1, 3])
    pm.load_peft_adapter(tmp_path / "peft", user=2)
    assert all(torch.equal(v, pm.get_user_state([0, 1, 3])[k]) for k, v in others.items())  # only user 2 changes
    for _, layer in pm.adapted_layers():
        layer.use_experts = False
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, user_ids=[2, 2]).logits, want, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="rank 4 != user_rank 2"):
        pm2 = get_proper_model(copy.deepcopy(orig), tiny_proper_config(user_rank=2))
        pm2.load_peft_adapter(tmp_path / "peft", user=0)
    with pytest.raises(ValueError, match="population_rank"):
        get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=8)).load_peft_adapter(tmp_path / "peft")
    with pytest.raises(ValueError, match="unknown user id"):
        pm.load_peft_adapter(tmp_path / "peft", user=4)
    merged = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=4))
    merged.set_stage("group")
    with pytest.raises(RuntimeError, match="already merged"):
        merged.load_peft_adapter(tmp_path / "peft")


def test_peft_import_into_fewer_targets_is_refused(tmp_path):
    orig = tiny_causal_lm()
    random_peft_lora(copy.deepcopy(orig), r=4, alpha=4).save_pretrained(tmp_path)
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=4, target_modules=("up_proj",)))
    with pytest.raises(ValueError, match="does not adapt"):
        pm.load_peft_adapter(tmp_path)


@pytest.mark.parametrize("flag", [{"use_dora": True}, {"peft_type": "IA3"}, {"bias": "all"},
                                  {"rank_pattern": {"up_proj": 2}}])
def test_peft_adapters_that_cannot_be_imported(tmp_path, flag):
    orig = tiny_causal_lm()
    random_peft_lora(copy.deepcopy(orig), r=4, alpha=4).save_pretrained(tmp_path)
    cpath = tmp_path / "adapter_config.json"
    cpath.write_text(json.dumps(dict(json.loads(cpath.read_text()), **flag)))
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=4))
    with pytest.raises(ValueError, match="can(not)? be imported"):
        pm.load_peft_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        pm.load_peft_adapter(tmp_path / "nowhere")


@pytest.mark.parametrize("include_population", [True, False])
def test_peft_export_user_loads_in_peft(tmp_path, include_population):
    pm, orig = trained_proper_model()
    pm.export_peft_user(tmp_path, 3, include_population=include_population)
    ids = torch.tensor(random_token_seqs([7, 5 + 2]))
    base = copy.deepcopy(orig)
    if not include_population:  # the adapter then applies on the merged base
        merged = {n: l.weight for n, l in pm.adapted_layers()}
        with torch.no_grad():
            for n, w in merged.items():
                base.get_submodule(n).weight.copy_(w)
    pmodel = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    for _, layer in pm.adapted_layers():
        layer.use_experts = False
    with torch.no_grad():
        got = pmodel(input_ids=ids).logits
        want = pm(input_ids=ids, user_ids=[3, 3]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_export_needs_user_adapters(tmp_path):
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config(num_users=0))
    with pytest.raises(ValueError, match="no user adapters"):
        pm.export_peft_user(tmp_path, 0)


@pytest.mark.parametrize("merged", [False, True])
def test_peft_population_import_survives_save_load_bit_exact(tmp_path, merged):
    # r = 5, alpha = 8, rslora: s = 8 / sqrt(5), and (s * 5) / 5 != s in floating point.
    orig = tiny_causal_lm()
    random_peft_lora(copy.deepcopy(orig), 5, 8, ["up_proj"], use_rslora=True).save_pretrained(tmp_path / "peft")
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=5))
    pm.set_stage("population")
    pm.load_peft_adapter(tmp_path / "peft")
    # train on: every layer's population LoRA, the untouched ones too
    randomize_adapters(pm, seed=9, names=("population_B",))
    if merged:
        pm.set_stage("group")
    ids = torch.tensor(random_token_seqs([7, 7]))
    users = [0, 1] if merged else None
    pm.save_pretrained(tmp_path / "ckpt")
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(pm2(input_ids=ids, user_ids=users).logits, pm(input_ids=ids, user_ids=users).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_export_peft_user_after_moving_the_merged_model(tmp_path):
    pm, _ = trained_proper_model()  # merged on the CPU
    pm.to("cuda")
    pm.export_peft_user(tmp_path, 1)  # the kept population factors are still on the CPU
    pm.to("cpu")
    pm.export_peft_user(tmp_path / "cpu", 1)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "cpu" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
