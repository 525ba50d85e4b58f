"""PEFT LoRA directories in and out of ProperModel (proper_kernels.integrations.peft_io),
checked against peft itself on tiny random Llama models (CPU): import as the
population LoRA or as one user's adapter (on at once, in every stage, training
nothing more), users of smaller ranks zero-padded into one bank and larger ones
refused, ProperModel.from_peft_users against PEFT's own mixed-batch inference, export
of a user that PeftModel loads, scales that survive a save/load bit-exactly, and the
adapters that cannot be imported."""
import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    assert_close, left_pad, random_peft_lora, random_token_seqs, randomize_adapters, tiny_causal_lm, tiny_proper_config,
    trained_proper_model)

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


# ---------------------------------------------------------------------- loaded adapters are on
def _requires_grad(pm):
    return {n: p.requires_grad for n, p in pm.named_parameters()}


@pytest.mark.parametrize("stage", [None, "population", "group", "user"])
def test_a_loaded_user_adapter_is_on_in_every_stage(tmp_path, stage):
    """load_peft_adapter(dir, user=u) makes u's rows compute PEFT's output whatever the
    stage (the fresh experts, population LoRA and V_u add nothing), leaves the other
    rows alone and unfreezes nothing."""
    orig = tiny_causal_lm()
    pmodel = random_peft_lora(copy.deepcopy(orig), r=2, alpha=8)  # s = 4, the bank's s_u = 2: B is rescaled
    pmodel.save_pretrained(tmp_path)
    ids = torch.tensor(random_token_seqs([7, 7, 7]))
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config())
    for st in {None: [], "population": ["population"], "group": ["group"], "user": ["group", "user"]}[stage]:
        pm.set_stage(st)
    with torch.no_grad():
        before = pm(input_ids=ids, user_ids=[2, 1, -1]).logits
        grads = _requires_grad(pm)
        pm.load_peft_adapter(tmp_path, user=2)
        got = pm(input_ids=ids, user_ids=[2, 1, -1]).logits
        want = pmodel(input_ids=ids[:1]).logits
    assert pm.stage == stage and pm.loaded_adapters == {"user"}
    assert _requires_grad(pm) == grads  # loading trains nothing
    assert (got[0] - before[0]).abs().max() > 1e-2
    torch.testing.assert_close(got[:1], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1:], before[1:])  # another user, no user
    if stage in (None, "population"):
        with pytest.raises(ValueError, match="user adapters were loaded.*pass user_ids"):
            pm(input_ids=ids)


def test_a_loaded_population_adapter_is_on_without_a_stage(tmp_path):
    orig = tiny_causal_lm()
    pmodel = random_peft_lora(copy.deepcopy(orig), r=4, alpha=4)
    pmodel.save_pretrained(tmp_path)
    ids = torch.tensor(random_token_seqs([7, 7]))
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(population_rank=4))
    pm.load_peft_adapter(tmp_path)
    assert pm.stage is None and pm.num_trainable_parameters() == 0
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, pmodel(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    pm.set_stage("group")  # merged into W0: no longer a loaded part
    assert pm.loaded_adapters == set()


# ---------------------------------------------------------------------- users of other ranks
def test_a_user_of_smaller_rank_is_zero_padded_exactly(tmp_path):
    orig = tiny_causal_lm()
    random_peft_lora(copy.deepcopy(orig), r=2, alpha=4).save_pretrained(tmp_path)  # s = 2
    ids = torch.tensor(random_token_seqs([7, 7]))
    out = {}
    for rank in (2, 8):  # s_u = 2 in both banks: only the padding differs
        pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(user_rank=rank, user_alpha=2.0 * rank))
        pm.load_peft_adapter(tmp_path, user=1)
        with torch.no_grad():
            out[rank] = pm(input_ids=ids, user_ids=[1, -1]).logits
        if rank == 8:
            state = pm.get_user_state([1])
            for name in pm.layer_names:
                assert not state[f"{name}.user_A"][0, 2:].any() and not state[f"{name}.user_B"][0, :, 2:].any()
    assert torch.equal(out[2], out[8])


def test_a_user_of_larger_rank_is_refused_naming_both_ranks(tmp_path):
    orig = tiny_causal_lm()
    random_peft_lora(copy.deepcopy(orig), r=4, alpha=4).save_pretrained(tmp_path)
    pm = get_proper_model(copy.deepcopy(orig), tiny_proper_config(user_rank=2))
    before = pm.get_user_state([0])
    with pytest.raises(ValueError, match=r"rank 4 > the bank's user_rank 2.*ProperConfig\(user_rank=4\)"):
        pm.load_peft_adapter(tmp_path, user=0)
    assert all(torch.equal(v, pm.get_user_state([0])[k]) for k, v in before.items())
    assert pm.loaded_adapters == set()


# ---------------------------------------------------------------------- serving PEFT users
# Three users of ranks 2, 4, 8, different alphas (one rslora) and different targets.
PEFT_USERS = {"alice": dict(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
              7: dict(r=4, alpha=16, target_modules=["up_proj", "down_proj"]),
              "carol": dict(r=8, alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"])}


def _save_peft_users(orig, parent):
    """{name: directory} of the PEFT_USERS adapters of ``orig``, saved under ``parent``."""
    dirs = {}
    for seed, (name, kw) in enumerate(PEFT_USERS.items(), start=10):
        dirs[name] = os.path.join(parent, str(name))
        random_peft_lora(copy.deepcopy(orig), seed=seed, **kw).save_pretrained(dirs[name])
    return dirs


def _peft_multi(orig, dirs):
    """A PeftModel of ``orig`` holding every adapter of ``dirs``, named str(name)."""
    names = iter(dirs)
    first = next(names)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(orig), dirs[first], adapter_name=str(first))
    for name in names:
        model.load_adapter(dirs[name], adapter_name=str(name))
    return model.eval()


def test_from_peft_users_equals_peft_mixed_batch(tmp_path):
    orig = tiny_causal_lm()
    dirs = _save_peft_users(orig, tmp_path)
    pm = ProperModel.from_peft_users(copy.deepcopy(orig), dirs)
    assert pm.user_rows == {"alice": 0, 7: 1, "carol": 2}
    cfg = pm.proper_config
    assert cfg.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert (cfg.user_rank, cfg.user_alpha, cfg.num_experts, cfg.population_rank) == (8, 8.0, 0, 0)
    assert pm.stage is None and pm.num_trainable_parameters() == 0

    peft_model = _peft_multi(orig, dirs)
    ids, mask, pos = left_pad(random_token_seqs([5, 9, 7, 6, 8]))
    names = ["carol", "alice", "__base__", "7", "alice"]
    rows = [pm.user_rows["carol"], pm.user_rows["alice"], -1, pm.user_rows[7], pm.user_rows["alice"]]
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=rows).logits
        want = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names).logits
        exact = copy.deepcopy(peft_model).double()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                   adapter_names=names).logits
    assert_close("from_peft_users logits", got, exact, want)
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want_tokens = peft_model.generate(input_ids=ids, adapter_names=names, **gen)
    assert torch.equal(pm.generate(ids, user_ids=rows, **gen), want_tokens)

    # a full save keeps the users on and their names
    pm.save_pretrained(tmp_path / "ckpt")
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ckpt")
    assert pm2.user_rows == pm.user_rows and pm2.loaded_adapters == {"user"}
    with torch.no_grad():
        assert torch.equal(pm2(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=rows).logits, got)
    # a user subset carries its name to the row it is loaded at (that row's old name goes)
    pm.save_pretrained(tmp_path / "carol", users=[pm.user_rows["carol"]])
    pm2.load_users(tmp_path / "carol", at=[0])
    assert pm2.user_rows == {7: 1, "carol": 0}


def test_from_peft_users_of_a_parent_directory(tmp_path):
    orig = tiny_causal_lm()
    _save_peft_users(orig, tmp_path)
    (tmp_path / "notes").mkdir()  # no adapter_config.json: not a user
    pm = ProperModel.from_peft_users(copy.deepcopy(orig), tmp_path)
    assert pm.user_rows == {"7": 0, "alice": 1, "carol": 2}  # sorted subdirectory names
    by_name = ProperModel.from_peft_users(copy.deepcopy(orig), {"alice": tmp_path / "alice"})
    ids = torch.tensor(random_token_seqs([6]))
    with torch.no_grad():  # the same user at another row: equal up to the rounding of another tile layout
        torch.testing.assert_close(pm(input_ids=ids, user_ids=[1]).logits, by_name(input_ids=ids, user_ids=[0]).logits,
                                   rtol=1e-5, atol=1e-6)


def test_from_peft_users_refuses_clearly(tmp_path):
    orig = tiny_causal_lm()
    dirs = _save_peft_users(orig, tmp_path)
    base = copy.deepcopy(orig)
    with pytest.raises(ValueError, match="is one PEFT adapter, not a directory of them"):
        ProperModel.from_peft_users(base, dirs["alice"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no subdirectory"):
        ProperModel.from_peft_users(base, tmp_path / "empty")
    with pytest.raises(ValueError, match="adapters is empty"):
        ProperModel.from_peft_users(base, {})
    with pytest.raises(TypeError, match="user names must be str or int"):
        ProperModel.from_peft_users(base, {1.5: dirs["alice"]})
    other = tiny_causal_lm()
    other.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 40, bias=False)  # another shape
    with pytest.raises(ValueError, match=r"user 7 .*up_proj: PEFT shapes .* do not fit a 32->40 linear"):
        ProperModel.from_peft_users(other, dirs)
    assert not any(n.endswith("user_A") for n, _ in other.named_parameters())  # checked before any change
    assert isinstance(base.model.layers[0].self_attn.q_proj, torch.nn.Linear)
