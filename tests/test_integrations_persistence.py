"""Saving and loading ProperModel (proper_kernels.integrations.persistence) on tiny
random Llama models (CPU): full saves and user subsets reload bit-exactly, frozen users
survive a full save, wrong directories are refused, and the state_dict of a model with
tied weights goes through safetensors and HF Trainer checkpoints."""
import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from proper_kernels.integrations.persistence import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    assert_close, collate_lm, counting_corpus, left_pad, random_token_seqs, randomize_adapters, tiny_causal_lm,
    tiny_proper_config, tiny_training_args, trained_proper_model)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------- full saves and user subsets
def test_save_load_bit_exact(tmp_path):
    pm, orig = trained_proper_model()
    pm.add_users(1)
    ids, mask, pos = left_pad(random_token_seqs([6, 9, 7]))
    users = [4, 1, -1]
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=users).logits
    pm.save_pretrained(tmp_path / "full")
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full")
    assert pm2.stage == "user" and pm2.num_users == 5 and pm2.population_merged
    assert pm2.stages_done == pm.stages_done
    with torch.no_grad():
        got = pm2(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=users).logits
    assert torch.equal(got, want)
    assert pm2.num_trainable_parameters() == pm.num_trainable_parameters()

    # one user alone: small, nothing shared, loadable at another id
    pm.save_pretrained(tmp_path / "u1", users=[1])
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "u1" / WEIGHTS_NAME).keys()
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"user_embedding", "user_A", "user_B", "user_router"}
    with pytest.raises(ValueError, match="user subset"):
        ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "u1")
    assert pm2.load_users(tmp_path / "u1", at=[3]) == [3]
    with torch.no_grad():
        a = pm(input_ids=ids[1:2], user_ids=[1]).logits
        b = pm2(input_ids=ids[1:2], user_ids=[3]).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown user id"):
        pm2.load_users(tmp_path / "u1", at=[9])
    with pytest.raises(ValueError, match="holds 1 users but 2 target ids"):
        pm2.load_users(tmp_path / "u1", at=[0, 2])
    with pytest.raises(ValueError, match="full save, not a user subset"):
        pm2.load_users(tmp_path / "full")


def test_save_load_in_population_stage(tmp_path):
    base = tiny_causal_lm()
    orig = copy.deepcopy(base)
    pm = get_proper_model(base, tiny_proper_config())
    pm.set_stage("population")
    randomize_adapters(pm)
    pm.save_pretrained(tmp_path)
    pm2 = ProperModel.from_pretrained(orig, tmp_path)
    ids = torch.tensor(random_token_seqs([7]))
    assert torch.equal(pm(input_ids=ids).logits, pm2(input_ids=ids).logits)
    assert pm2.stage == "population" and not pm2.population_merged


def _user_only_model(orig, **overrides):
    """A ProperModel of a copy of ``orig`` with user LoRAs only (no experts, no population LoRA)."""
    return get_proper_model(copy.deepcopy(orig), tiny_proper_config(num_experts=0, population_rank=0, **overrides))


def test_loaded_users_are_on_and_keep_their_output_at_another_rank_and_scale(tmp_path):
    """load_users into a model in no stage: the user is on at once (nothing trains), and
    a user of rank 2 and s_u = 2 computes the same in a bank of rank 4 and s_u = 1
    (zero-padded, its scale folded into B_u)."""
    orig = tiny_causal_lm()
    src = _user_only_model(orig, user_rank=2, user_alpha=4.0).set_stage("user")
    randomize_adapters(src, names=("user_B",))
    src.save_pretrained(tmp_path, users=[1])
    dst = _user_only_model(orig, user_rank=4, user_alpha=4.0)
    assert dst.load_users(tmp_path, at=[3]) == [3]
    assert dst.stage is None and dst.num_trainable_parameters() == 0 and dst.loaded_adapters == {"user"}
    ids = torch.tensor(random_token_seqs([7, 7]))
    with torch.no_grad():
        got = dst(input_ids=ids, user_ids=[3, -1]).logits
        want = src(input_ids=ids, user_ids=[1, -1]).logits
        exact = copy.deepcopy(src).double()(input_ids=ids, user_ids=[1, -1]).logits
        base = orig(input_ids=ids).logits
    assert (want[0] - base[0]).abs().max() > 1e-2  # the user changes the output
    assert_close("user loaded at rank 4, s_u 1", got, exact, want)


def test_load_users_refuses_a_larger_rank_and_other_router_sizes(tmp_path):
    orig = tiny_causal_lm()
    _user_only_model(orig, user_rank=4).save_pretrained(tmp_path / "r4", users=[1])
    dst = _user_only_model(orig, user_rank=2)
    before = dst.get_user_state([3])
    with pytest.raises(ValueError, match=r"rank 4 > the bank's user_rank 2.*ProperConfig\(user_rank=4\)"):
        dst.load_users(tmp_path / "r4", at=[3])
    assert all(torch.equal(dst.get_user_state([3])[k], v) for k, v in before.items())  # nothing written
    assert dst.loaded_adapters == set()
    pm, _ = trained_proper_model()
    pm.save_pretrained(tmp_path / "e4", users=[1])
    other, _ = trained_proper_model(user_embed_dim=3)  # the rows mean something else
    with pytest.raises(ValueError, match="user_embed_dim"):
        other.load_users(tmp_path / "e4", at=[3])


def test_full_save_keeps_the_frozen_users(tmp_path):
    """Per-user early stopping survives a checkpoint: users frozen before a full save
    are pinned again, at their saved rows, after from_pretrained (a subset save
    carries no freeze)."""
    pm, orig = trained_proper_model()
    pm.freeze_users([2, 0])
    pm.save_pretrained(tmp_path / "full")
    pm.save_pretrained(tmp_path / "sub", users=[2])
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full")
    assert pm2.frozen_users == [0, 2]
    pinned = pm2.get_user_state([0, 2])
    opt = torch.optim.AdamW(pm2.trainable_parameters(), lr=1e-2)
    ids = torch.tensor(random_token_seqs([6, 6, 6]))
    opt.zero_grad()
    pm2(input_ids=ids, labels=ids, user_ids=[0, 1, 2]).loss.backward()
    opt.step()
    pm2.restore_frozen_users()
    assert all(torch.equal(pm2.get_user_state([0, 2])[k], v) for k, v in pinned.items())
    assert json.loads((tmp_path / "sub" / CONFIG_NAME).read_text())["frozen_users"] == []


def test_a_save_without_frozen_users_loads_with_none(tmp_path):
    pm, orig = trained_proper_model()
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["frozen_users"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    assert ProperModel.from_pretrained(orig, tmp_path).frozen_users == []


def test_wrong_directories_are_refused(tmp_path):
    pm, orig = trained_proper_model()
    with pytest.raises(FileNotFoundError, match="not a ProperModel directory"):
        ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path)
    pm.save_pretrained(tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(dict(meta, format="other/9")))
    with pytest.raises(ValueError, match="unknown format"):
        ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ok")
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(dict(meta, layers=meta["layers"][:-1])))  # another base
    with pytest.raises(ValueError, match="targeted layers differ"):
        ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ok")
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ok" / WEIGHTS_NAME)
    for key in ("model.layers.1.mlp.up_proj.expert_B", "model.layers.1.mlp.up_proj.user_A"):  # shared, per-user
        save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "ok" / WEIGHTS_NAME)
        with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
            ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ok")
        save_file(dict(tensors, **{key: tensors[key][:1]}), tmp_path / "ok" / WEIGHTS_NAME)
        with pytest.raises(ValueError, match="saved shape"):
            ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ok")
    save_file(dict(tensors, extra=tensors[key].clone()), tmp_path / "ok" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="unexpected tensors"):
        ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ok")
    pm.save_pretrained(tmp_path / "u", users=[0])
    other_targets = get_proper_model(tiny_causal_lm(), tiny_proper_config(target_modules=("up_proj",)))
    with pytest.raises(ValueError, match="target_modules"):
        other_targets.load_users(tmp_path / "u")


# ---------------------------------------------------------------------- state_dict of tied models
def test_state_dict_of_a_tied_model_saves_with_safetensors_and_loads_back(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = get_proper_model(tiny_causal_lm(tie_word_embeddings=True), tiny_proper_config())
    pm.set_stage("population")
    randomize_adapters(pm, names=("population_B",))
    sd = pm.state_dict()
    assert "model.model.embed_tokens.weight" in sd and "model.lm_head.weight" not in sd  # one copy of a tie
    save_file(sd, tmp_path / "m.safetensors")  # refuses tensors that share memory
    other = get_proper_model(tiny_causal_lm(seed=1, tie_word_embeddings=True), tiny_proper_config())
    other.set_stage("population")
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))  # strict: the tied key is filled in
    assert other.model.lm_head.weight is other.model.model.embed_tokens.weight
    ids = torch.tensor(random_token_seqs([6, 6]))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_trainer_checkpoints_a_tied_model_and_resumes(tmp_path):
    from transformers import Trainer

    def args(steps, save):
        return tiny_training_args(tmp_path, max_steps=steps, save_strategy="steps" if save else "no", save_steps=2)

    pm = get_proper_model(tiny_causal_lm(tie_word_embeddings=True), tiny_proper_config(num_users=2))
    pm.set_stage("group")
    Trainer(model=pm, args=args(2, True), train_dataset=counting_corpus(), data_collator=collate_lm).train()
    assert os.path.isfile(tmp_path / "checkpoint-2" / "model.safetensors")
    Trainer(model=pm, args=args(3, False), train_dataset=counting_corpus(), data_collator=collate_lm).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
