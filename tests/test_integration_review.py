"""Review of the Hugging Face integration: edge cases a demanding user hits.

Tied embeddings with an adapted lm_head, dtype changes before add_users, user subsets
loaded into a model with another user scale, PEFT imports whose scale must survive a
save/load bit-exactly, tuple outputs (return_dict=False), and clear user_ids errors.
"""
import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from test_integration import (  # noqa: E402,F401 - _one_thread: the same autouse fixture here
    VOCAB, _one_thread, config, rand_seqs, randomize, tiny_model, trained_user_model)


@torch.no_grad()
def randomize_population(pm, seed=1, scale=0.3):
    """Random population B only (as after the population stage; the rest stays at zero)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in pm.adapted_layers():
        layer.population_B.copy_(torch.randn(layer.population_B.shape, generator=g) * scale)


def tied_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    return m


# ---------------------------------------------------------------------- tied embeddings
def test_merge_into_tied_lm_head_leaves_the_input_embedding_alone(tmp_path):
    base = tied_llama()
    orig = copy.deepcopy(base)
    emb0 = base.model.embed_tokens.weight.detach().clone()
    pm = get_proper_model(base, config(target_modules=("up_proj", "lm_head")))
    assert "lm_head" in pm.layer_names
    pm.set_stage("population")
    randomize_population(pm)
    ids = torch.tensor(rand_seqs([8, 8]))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        pm.set_stage("group")  # merges the population LoRA
        after = pm(input_ids=ids, user_ids=[0, 1]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(pm.model.model.embed_tokens.weight, emb0)
    # the reload merges the same way
    pm.set_stage("user")
    randomize(pm, seed=4)
    pm.save_pretrained(tmp_path)
    pm2 = ProperModel.from_pretrained(orig, tmp_path)
    with torch.no_grad():
        a = pm(input_ids=ids, user_ids=[0, 3]).logits
        b = pm2(input_ids=ids, user_ids=[0, 3]).logits
    assert torch.equal(a, b)
    assert torch.equal(pm2.model.model.embed_tokens.weight, emb0)


def test_tied_qwen2_default_targets_all_stages():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, pad_token_id=0)).eval()
    pm = get_proper_model(base, config())
    pm.set_stage("population")
    randomize_population(pm)
    ids = torch.tensor(rand_seqs([6, 6]))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        pm.set_stage("group")
        torch.testing.assert_close(pm(input_ids=ids, user_ids=[0, 1]).logits, before, rtol=1e-5, atol=1e-5)
    pm.set_stage("user")
    out = pm.generate(ids, user_ids=[2, -1], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 9)
    assert pm.model.lm_head.weight is pm.model.model.embed_tokens.weight  # untouched: still tied


# ---------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_users_after_casting_the_model_keeps_one_dtype(dtype):
    pm = get_proper_model(tiny_model(), config(num_users=0))
    pm.to(dtype)
    pm.set_stage("group")
    pm.add_users(2)
    pm.set_stage("user")
    dtypes = {n: p.dtype for n, p in pm.named_parameters()}
    assert set(dtypes.values()) == {dtype}, {n: d for n, d in dtypes.items() if d != dtype}
    ids = torch.tensor(rand_seqs([5, 5]))
    pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss.backward()


# ---------------------------------------------------------------------- user subsets
def test_load_users_refuses_another_user_scale(tmp_path):
    pm, _ = trained_user_model()
    pm.save_pretrained(tmp_path, users=[1])
    other, _ = trained_user_model(user_alpha=8.0)  # same ranks, another s_u: the rows mean something else
    before = other.get_user_state([3])
    with pytest.raises(ValueError, match="user_alpha"):
        other.load_users(tmp_path, at=[3])
    after = other.get_user_state([3])
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_set_user_state_writes_nothing_when_it_refuses():
    pm, _ = trained_user_model()
    before = pm.get_user_state([0, 1])
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    last = list(bad)[-1]
    bad[last] = bad[last][:, :1]  # the last tensor has a wrong shape
    with pytest.raises(ValueError, match="expected"):
        pm.set_user_state(bad, [0, 1])
    del bad[last]
    with pytest.raises(KeyError, match="lacks"):
        pm.set_user_state(bad, [0, 1])
    after = pm.get_user_state([0, 1])
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------- PEFT population scale
def _peft_dir(orig, path, r, alpha, modules, rslora):
    peft = pytest.importorskip("peft")
    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, task_type="CAUSAL_LM",
                           use_rslora=rslora)
    model = peft.get_peft_model(copy.deepcopy(orig), lcfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("merged", [False, True])
def test_peft_population_import_survives_save_load_bit_exact(tmp_path, merged):
    # r = 5, alpha = 8, rslora: s = 8 / sqrt(5), and (s * 5) / 5 != s in floating point.
    orig = tiny_model()
    _peft_dir(orig, tmp_path / "peft", 5, 8, ["up_proj"], True)
    pm = get_proper_model(copy.deepcopy(orig), config(population_rank=5))
    pm.set_stage("population")
    pm.load_peft_adapter(tmp_path / "peft")
    randomize_population(pm, seed=9)  # train on: every layer's population LoRA, the untouched ones too
    if merged:
        pm.set_stage("group")
    ids = torch.tensor(rand_seqs([7, 7]))
    users = [0, 1] if merged else None
    pm.save_pretrained(tmp_path / "ckpt")
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(pm2(input_ids=ids, user_ids=users).logits, pm(input_ids=ids, user_ids=users).logits)


def test_aux_loss_added_to_tuple_outputs_too():
    pm, _ = trained_user_model()
    pm.set_stage("group")
    ids = torch.tensor(rand_seqs([8, 8]))
    with torch.no_grad():
        as_dict = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
        as_tuple = pm(input_ids=ids, labels=ids, user_ids=[0, 1], return_dict=False)[0]
    assert torch.equal(as_tuple, as_dict)


def test_user_ids_scalar_gives_a_clear_error():
    pm, _ = trained_user_model()
    ids = torch.tensor(rand_seqs([5]))
    for call in (lambda: pm(input_ids=ids, user_ids=3),
                 lambda: pm.generate(ids, user_ids=3, max_new_tokens=1, pad_token_id=0)):
        with pytest.raises((TypeError, ValueError), match="user_ids"):
            call()


# ---------------------------------------------------------------------- checkpoints of tied models
def test_state_dict_of_a_tied_model_saves_with_safetensors_and_loads_back(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = get_proper_model(tied_llama(), config())
    pm.set_stage("population")
    randomize_population(pm)
    sd = pm.state_dict()
    assert "model.model.embed_tokens.weight" in sd and "model.lm_head.weight" not in sd  # one copy of a tie
    save_file(sd, tmp_path / "m.safetensors")  # refuses tensors that share memory
    other = get_proper_model(tied_llama(seed=1), config())
    other.set_stage("population")
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))  # strict: the tied key is filled in
    assert other.model.lm_head.weight is other.model.model.embed_tokens.weight
    ids = torch.tensor(rand_seqs([6, 6]))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_trainer_checkpoints_a_tied_model_and_resumes(tmp_path):
    from test_integration import _collate, _corpus
    from transformers import Trainer, TrainingArguments

    def args(steps, save):
        return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps,
                                 save_strategy="steps" if save else "no", save_steps=2, report_to=[],
                                 logging_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)

    pm = get_proper_model(tied_llama(), config(num_users=2))
    pm.set_stage("group")
    Trainer(model=pm, args=args(2, True), train_dataset=_corpus(), data_collator=_collate).train()
    assert os.path.isfile(tmp_path / "checkpoint-2" / "model.safetensors")
    Trainer(model=pm, args=args(3, False), train_dataset=_corpus(), data_collator=_collate).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_export_peft_user_after_moving_the_merged_model(tmp_path):
    pm, _ = trained_user_model()  # merged on the CPU
    pm.to("cuda")
    pm.export_peft_user(tmp_path, 1)  # the kept population factors are still on the CPU
    pm.to("cpu")
    pm.export_peft_user(tmp_path / "cpu", 1)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "cpu" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_callers_config_is_not_mutated(tmp_path):
    cfg = config(population_rank=5)
    pm = get_proper_model(tiny_model(), cfg)
    pm.add_users(2)
    _peft_dir(tiny_model(), tmp_path, 5, 8, ["up_proj"], True)
    pm.load_peft_adapter(tmp_path)  # sets the population scale to PEFT's
    assert pm.num_users == 6 and pm.proper_config.population_alpha != 16.0
    assert cfg == config(population_rank=5)  # the caller's object: what it was
    assert get_proper_model(tiny_model(), cfg).num_users == 4


def test_full_save_keeps_the_frozen_users(tmp_path):
    """Per-user early stopping survives a checkpoint: users frozen before a full save
    are pinned again, at their saved rows, after from_pretrained (a subset save
    carries no freeze)."""
    pm, orig = trained_user_model()
    pm.freeze_users([2, 0])
    pm.save_pretrained(tmp_path / "full")
    pm.save_pretrained(tmp_path / "sub", users=[2])
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full")
    assert pm2.frozen_users == [0, 2]
    pinned = pm2.get_user_state([0, 2])
    opt = torch.optim.AdamW(pm2.trainable_parameters(), lr=1e-2)
    ids = torch.tensor(rand_seqs([6, 6, 6]))
    opt.zero_grad()
    pm2(input_ids=ids, labels=ids, user_ids=[0, 1, 2]).loss.backward()
    opt.step()
    pm2.restore_frozen_users()
    assert all(torch.equal(pm2.get_user_state([0, 2])[k], v) for k, v in pinned.items())
    assert json.loads((tmp_path / "sub" / "proper_config.json").read_text())["frozen_users"] == []
