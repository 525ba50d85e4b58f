"""Stages and user routing of ProperModel (proper_kernels.integrations.stages), on tiny
random Llama / Qwen2 models (CPU).

What each stage switches on and trains, the population merge (tied lm_head too), the
auxiliary losses, and the routing of a batch: mixed-user batches == each user alone
(forward and greedy generate, left padding), gradients only from a user's own tokens,
gradient checkpointing, torch.compile, and the errors of set_stage and user_ids.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from proper_kernels.integrations import ProperModel, get_proper_model  # noqa: E402
from proper_kernels.testing import (  # noqa: E402
    left_pad, random_token_seqs, randomize_adapters, tiny_causal_lm, tiny_proper_config, trained_proper_model)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------- stages
def test_stage_switching_trains_exactly_what_it_should():
    cfg = tiny_proper_config()
    pm = get_proper_model(tiny_causal_lm(), cfg)
    assert pm.stage is None and pm.num_trainable_parameters() == 0
    d = {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    L, K, r, N, ru, de, rp = 2, cfg.num_experts, cfg.expert_rank, cfg.num_users, cfg.user_rank, cfg.user_embed_dim, cfg.population_rank
    pop = sum(L * rp * (i + o) for i, o in d.values())
    group = sum(L * (K * r * (i + o) + K * i + K * de + N * de) for i, o in d.values())
    user = sum(L * (N * de + N * ru * (i + o) + N * K * ru) for i, o in d.values())
    pm.set_stage("population")
    assert pm.num_trainable_parameters() == pop
    pm.set_stage("group")
    assert pm.population_merged and pm.num_trainable_parameters() == group
    pm.set_stage("user")
    assert pm.num_trainable_parameters() == user
    assert pm.stages_done == ["population", "group", "user"]
    names = {n.rsplit(".", 1)[-1] for n, p in pm.named_parameters() if p.requires_grad}
    assert names == {"user_embedding", "user_A", "user_B", "user_router"}
    # the base never trains
    assert not any(p.requires_grad for n, p in pm.named_parameters() if n.endswith(("weight", "bias")) and "router" not in n)


def test_set_stage_errors_are_clear():
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config())
    with pytest.raises(ValueError, match="stage must be one of"):
        pm.set_stage("users")
    with pytest.raises(RuntimeError, match="user stage before group stage") as err:
        pm.set_stage("user")
    for what_to_call in ("set_stage('group')", "ProperConfig(num_experts=0)", "load_peft_adapter(dir, user=u)",
                         "load_users(dir)", "ProperModel.from_peft_users(model, {name: peft_dir})"):
        assert what_to_call in str(err.value)
    pm.set_stage("group")
    with pytest.raises(RuntimeError, match="already merged"):
        pm.set_stage("population")
    with pytest.raises(ValueError, match="num_experts > 0"):
        get_proper_model(tiny_causal_lm(), tiny_proper_config(num_experts=0)).set_stage("group")
    with pytest.raises(ValueError, match="num_users > 0"):
        get_proper_model(tiny_causal_lm(), tiny_proper_config(num_experts=0, num_users=0)).set_stage("user")
    with pytest.raises(ValueError, match="population_rank > 0"):
        get_proper_model(tiny_causal_lm(), tiny_proper_config(population_rank=0)).set_stage("population")


def test_merge_population_keeps_logits():
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config())
    pm.set_stage("population")
    randomize_adapters(pm)
    ids = torch.tensor(random_token_seqs([8, 8]))
    before = pm(input_ids=ids).logits
    pm.merge_population()
    assert all(layer.population_A is None for _, layer in pm.adapted_layers())
    after = pm(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (before - get_proper_model(tiny_causal_lm(), tiny_proper_config())(input_ids=ids).logits).abs().max() > 1e-3


def test_merge_into_tied_lm_head_leaves_the_input_embedding_alone(tmp_path):
    base = tiny_causal_lm(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    orig = copy.deepcopy(base)
    emb0 = base.model.embed_tokens.weight.detach().clone()
    pm = get_proper_model(base, tiny_proper_config(target_modules=("up_proj", "lm_head")))
    assert "lm_head" in pm.layer_names
    pm.set_stage("population")
    randomize_adapters(pm, names=("population_B",))
    ids = torch.tensor(random_token_seqs([8, 8]))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        pm.set_stage("group")  # merges the population LoRA
        after = pm(input_ids=ids, user_ids=[0, 1]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(pm.model.model.embed_tokens.weight, emb0)
    # the reload merges the same way
    pm.set_stage("user")
    randomize_adapters(pm, seed=4)
    pm.save_pretrained(tmp_path)
    pm2 = ProperModel.from_pretrained(orig, tmp_path)
    with torch.no_grad():
        a = pm(input_ids=ids, user_ids=[0, 3]).logits
        b = pm2(input_ids=ids, user_ids=[0, 3]).logits
    assert torch.equal(a, b)
    assert torch.equal(pm2.model.model.embed_tokens.weight, emb0)


def test_tied_qwen2_default_targets_all_stages():
    base = tiny_causal_lm("qwen2", tie_word_embeddings=True)
    pm = get_proper_model(base, tiny_proper_config())
    pm.set_stage("population")
    randomize_adapters(pm, names=("population_B",))
    ids = torch.tensor(random_token_seqs([6, 6]))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        pm.set_stage("group")
        torch.testing.assert_close(pm(input_ids=ids, user_ids=[0, 1]).logits, before, rtol=1e-5, atol=1e-5)
    pm.set_stage("user")
    out = pm.generate(ids, user_ids=[2, -1], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 9)
    assert pm.model.lm_head.weight is pm.model.model.embed_tokens.weight  # untouched: still tied


# ---------------------------------------------------------------------- auxiliary losses
def test_group_stage_adds_aux_losses():
    pm, _ = trained_proper_model()
    pm.set_stage("group")
    ids = torch.tensor(random_token_seqs([8, 8]))
    with_aux = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
    pm.proper_config.balance_weight = pm.proper_config.diversity_weight = 0.0
    plain = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
    assert with_aux > plain
    assert set(pm.last_aux_losses) == {"balance", "diversity"}


def test_aux_loss_added_to_tuple_outputs_too():
    pm, _ = trained_proper_model()
    pm.set_stage("group")
    ids = torch.tensor(random_token_seqs([8, 8]))
    with torch.no_grad():
        as_dict = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
        as_tuple = pm(input_ids=ids, labels=ids, user_ids=[0, 1], return_dict=False)[0]
    assert torch.equal(as_tuple, as_dict)


def test_user_stage_adds_aux_losses_only_when_asked():
    pm, _ = trained_proper_model()
    ids = torch.tensor(random_token_seqs([8, 8]))
    with torch.no_grad():
        plain = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
        pm.proper_config.aux_in_user_stage = True
        with_aux = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
    aux = pm.aux_loss()  # of the last forward
    assert aux > 0
    torch.testing.assert_close(with_aux - plain, aux, rtol=0, atol=1e-6)  # a few ulps of the LM loss


# ---------------------------------------------------------------------- routing
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_forward_equals_each_user_alone(arch):
    pm, _ = trained_proper_model(arch)
    users = [2, 0, -1, 2, 3]
    seqs = random_token_seqs([6, 9, 4, 8, 7], seed=5)
    ids, mask, pos = left_pad(seqs)
    with torch.no_grad():
        mixed = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=users).logits
        for i, (u, s) in enumerate(zip(users, seqs)):
            alone = pm(input_ids=torch.tensor([s]), user_ids=[u]).logits[0]
            torch.testing.assert_close(mixed[i, -len(s):], alone, rtol=1e-5, atol=1e-5)
        # the users really differ
        a = pm(input_ids=torch.tensor([seqs[0]]), user_ids=[0]).logits
        b = pm(input_ids=torch.tensor([seqs[0]]), user_ids=[1]).logits
        assert (a - b).abs().max() > 1e-3
    assert all(layer.routing is None for _, layer in pm.adapted_layers())  # cleared after the call


def test_mixed_batch_greedy_generate_equals_each_user_alone():
    pm, _ = trained_proper_model("llama")
    users = [1, 3, -1, 1]
    seqs = random_token_seqs([5, 8, 3, 6], seed=7)
    ids, mask, _ = left_pad(seqs)
    out = pm.generate(ids, attention_mask=mask, user_ids=users, max_new_tokens=6, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert out.shape == (4, ids.shape[1] + 6)
    for i, (u, s) in enumerate(zip(users, seqs)):
        alone = pm.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                            user_ids=[u], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[i, ids.shape[1]:].tolist() == alone[0, len(s):].tolist()
    # routing is cleared after the call
    assert all(layer.routing is None for _, layer in pm.adapted_layers())


def test_generate_with_num_return_sequences_keeps_row_user():
    pm, _ = trained_proper_model("llama")
    ids = torch.tensor(random_token_seqs([5, 5], seed=3))
    out = pm.generate(ids, user_ids=[0, 2], max_new_tokens=3, do_sample=False, num_beams=2,
                      num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    assert out.shape[0] == 4
    # each returned row is one of its own row's beams: the same as generating that row alone
    for row, u in enumerate([0, 2]):
        alone = pm.generate(ids[row:row + 1], user_ids=[u], max_new_tokens=3, do_sample=False, num_beams=2,
                            num_return_sequences=2, pad_token_id=0, eos_token_id=None)
        assert out[2 * row:2 * row + 2].tolist() == alone.tolist()


def test_user_params_get_gradients_only_from_their_tokens():
    pm, _ = trained_proper_model()
    seqs = random_token_seqs([8, 8, 8, 8], seed=11)
    users = [0, 1, 0, 2]

    def grads(seqs):
        pm.zero_grad(set_to_none=True)
        ids = torch.tensor(seqs)
        pm(input_ids=ids, labels=ids, user_ids=users).loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    g1 = grads(seqs)
    for n, g in g1.items():  # user 3 is absent: no gradient at all
        assert g[3].abs().max() == 0, n
        assert g[1].abs().max() > 0, n
    seqs2 = [seqs[0], random_token_seqs([8], seed=99)[0], seqs[2], seqs[3]]  # change user 1's row only
    g2 = grads(seqs2)
    for n in g1:
        for u in (0, 2):
            torch.testing.assert_close(g2[n][u], g1[n][u], rtol=1e-6, atol=1e-9)
        assert not torch.allclose(g2[n][1], g1[n][1])


def test_gradient_checkpointing_keeps_routing_for_recompute():
    pm, _ = trained_proper_model()
    pm.train()
    ids = torch.tensor(random_token_seqs([8, 8, 8], seed=2))
    users = [0, 3, 1]

    def grads():
        pm.zero_grad(set_to_none=True)
        out = pm(input_ids=ids, labels=ids, user_ids=users)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    loss0, g0 = grads()
    pm.gradient_checkpointing_enable()
    assert pm.model.is_activation_checkpointing
    loss1, g1 = grads()
    assert all(layer.routing is not None for _, layer in pm.adapted_layers())  # kept for the recompute
    pm.clear_routing()
    assert all(layer.routing is None for _, layer in pm.adapted_layers())
    pm.gradient_checkpointing_disable()
    assert not pm.model.is_activation_checkpointing
    torch.testing.assert_close(loss1, loss0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_torch_compile_forward():
    pm, _ = trained_proper_model()
    ids = torch.tensor(random_token_seqs([6, 6], seed=4))
    compiled = torch.compile(pm, backend="eager")
    with torch.no_grad():
        for users in ([1, 2], [3, -1], [0, 0]):  # a new routing each call: same graph, right users
            want = pm(input_ids=ids, user_ids=users).logits
            got = compiled(input_ids=ids, user_ids=users).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_user_ids_raise_clear_errors():
    pm = get_proper_model(tiny_causal_lm(), tiny_proper_config())
    pm.set_stage("group")
    ids = torch.tensor(random_token_seqs([5, 5]))
    with pytest.raises(ValueError, match="pass user_ids"):
        pm(input_ids=ids)
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        pm(input_ids=ids, user_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"unknown user id\(s\) \[4\]"):
        pm(input_ids=ids, user_ids=[0, 4])
    with pytest.raises(ValueError, match="unknown user id"):
        pm(input_ids=ids, user_ids=[-2, 0])
    with pytest.raises(TypeError, match="integers"):
        pm(input_ids=ids, user_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        pm(input_ids=ids, user_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown user id"):
        pm.generate(ids, user_ids=[7, 0], max_new_tokens=1)
    with pytest.raises(ValueError, match="pass input_ids or inputs_embeds"):
        pm(user_ids=[0, 1])
    assert all(layer.routing is None for _, layer in pm.adapted_layers())  # nothing left after an error


def test_user_ids_scalar_gives_a_clear_error():
    pm, _ = trained_proper_model()
    ids = torch.tensor(random_token_seqs([5]))
    for call in (lambda: pm(input_ids=ids, user_ids=3),
                 lambda: pm.generate(ids, user_ids=3, max_new_tokens=1, pad_token_id=0)):
        with pytest.raises((TypeError, ValueError), match="user_ids"):
            call()
