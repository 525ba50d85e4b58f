"""Hugging Face integration: ProperModel on tiny random Llama / Qwen2 / Mistral (CPU).

Identity at creation, mixed-user batches == each user alone (forward and greedy
generate, left padding), the three stages (what trains), merge, save/load (full and
user subsets, bit-exact), PEFT import/export against peft itself, Trainer, gradient
checkpointing, torch.compile, and the error messages.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from proper_kernels.integrations import ProperConfig, ProperModel, get_proper_model  # noqa: E402

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(arch="llama", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    cfg = cls[0](**kw)
    if arch == "mistral":
        cfg.sliding_window = None
    return cls[1](cfg).eval()


def config(**kw):
    base = dict(num_experts=3, expert_rank=2, expert_alpha=4.0, num_users=4, user_rank=2, user_alpha=4.0,
                user_embed_dim=4, population_rank=4, population_alpha=8.0, backend="reference")
    base.update(kw)
    return ProperConfig(**base)


@torch.no_grad()
def randomize(pm, seed=1, scale=0.3):
    """Give every zero-initialised adapter tensor (B, V) random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in pm.adapted_layers():
        for name in ("population_B", "expert_B", "user_B", "user_router", "user_embedding"):
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trained_user_model(arch="llama", **kw):
    base = tiny_model(arch)
    orig = copy.deepcopy(base)
    pm = get_proper_model(base, config(**kw))
    pm.set_stage("population")
    randomize(pm, seed=1)
    pm.set_stage("group")
    randomize(pm, seed=2)
    pm.set_stage("user")
    randomize(pm, seed=3)
    return pm, orig


def left_pad(seqs, pad=0):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def rand_seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------- imports
def test_import_is_lazy():
    code = ("import sys, proper_kernels, proper_kernels.integrations as I; "
            "I.ProperModel, I.get_proper_model, I.ProperConfig; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'eager import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_config_json_roundtrip():
    cfg = config(top_k=2, target_modules=["up_proj"])
    assert ProperConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown ProperConfig fields"):
        ProperConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="top_k"):
        ProperConfig(num_experts=2, top_k=3)


# ---------------------------------------------------------------------- identity
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_identity_at_creation_and_each_stage(arch):
    base = tiny_model(arch)
    ref = copy.deepcopy(base)
    pm = get_proper_model(base, config())
    assert len(pm.layer_names) == 2 * 3
    ids, mask, pos = left_pad(rand_seqs([5, 9, 7]))
    want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(got, want)
    for stage in ("population", "group", "user"):  # B and V start at zero: still the base output
        pm.set_stage(stage)
        got = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=[0, 3, -1]).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_no_target_found_is_clear():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        get_proper_model(tiny_model(), config(target_modules=("fc1",)))


# ---------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_forward_equals_each_user_alone(arch):
    pm, _ = trained_user_model(arch)
    users = [2, 0, -1, 2, 3]
    seqs = rand_seqs([6, 9, 4, 8, 7], seed=5)
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


def test_mixed_batch_greedy_generate_equals_each_user_alone():
    pm, _ = trained_user_model("llama")
    users = [1, 3, -1, 1]
    seqs = rand_seqs([5, 8, 3, 6], seed=7)
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
    pm, _ = trained_user_model("llama")
    ids = torch.tensor(rand_seqs([5, 5], seed=3))
    out = pm.generate(ids, user_ids=[0, 2], max_new_tokens=3, do_sample=False, num_beams=2,
                      num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    assert out.shape[0] == 4


# ---------------------------------------------------------------------- stages
def test_stage_switching_trains_exactly_what_it_should():
    base = tiny_model()
    cfg = config()
    pm = get_proper_model(base, cfg)
    assert pm.num_trainable_parameters() == 0
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
    names = {n.rsplit(".", 1)[-1] for n, p in pm.named_parameters() if p.requires_grad}
    assert names == {"user_embedding", "user_A", "user_B", "user_router"}
    # the base never trains
    assert not any(p.requires_grad for n, p in pm.named_parameters() if n.endswith(("weight", "bias")) and "router" not in n)


def test_merge_population_keeps_logits():
    base = tiny_model()
    pm = get_proper_model(base, config())
    pm.set_stage("population")
    randomize(pm)
    ids = torch.tensor(rand_seqs([8, 8]))
    before = pm(input_ids=ids).logits
    pm.merge_population()
    assert all(layer.population_A is None for _, layer in pm.adapted_layers())
    after = pm(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (before - get_proper_model(tiny_model(), config())(input_ids=ids).logits).abs().max() > 1e-3


def test_group_stage_adds_aux_losses():
    pm, _ = trained_user_model()
    pm.set_stage("group")
    ids = torch.tensor(rand_seqs([8, 8]))
    with_aux = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
    pm.proper_config.balance_weight = pm.proper_config.diversity_weight = 0.0
    plain = pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss
    assert with_aux > plain
    assert set(pm.last_aux_losses) == {"balance", "diversity"}


def test_user_params_get_gradients_only_from_their_tokens():
    pm, _ = trained_user_model()
    seqs = rand_seqs([8, 8, 8, 8], seed=11)
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
    seqs2 = [seqs[0], rand_seqs([8], seed=99)[0], seqs[2], seqs[3]]  # change user 1's row only
    g2 = grads(seqs2)
    for n in g1:
        for u in (0, 2):
            torch.testing.assert_close(g2[n][u], g1[n][u], rtol=1e-6, atol=1e-9)
        assert not torch.allclose(g2[n][1], g1[n][1])


def test_add_users_after_group_stage():
    base = tiny_model()
    pm = get_proper_model(base, config(num_users=2))
    pm.set_stage("group")
    randomize(pm)
    new = pm.add_users(3)
    assert new == [2, 3, 4] and pm.num_users == 5
    pm.set_stage("user")
    for _, layer in pm.adapted_layers():
        assert layer.user_A.shape[0] == 5 and layer.user_B[2:].abs().max() == 0
        assert layer.user_A.requires_grad
    ids = torch.tensor(rand_seqs([6, 6]))
    loss = pm(input_ids=ids, labels=ids, user_ids=[4, 0]).loss
    loss.backward()
    assert pm.model.model.layers[0].mlp.up_proj.user_B.grad[4].abs().max() > 0


def test_freeze_users_for_early_stopping():
    pm, _ = trained_user_model()
    pm.freeze_users([1])
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    before = pm.get_user_state([0, 1])
    for _ in range(2):
        ids = torch.tensor(rand_seqs([6, 6]))
        opt.zero_grad()
        pm(input_ids=ids, labels=ids, user_ids=[0, 1]).loss.backward()
        opt.step()
        pm.restore_frozen_users()
    after = pm.get_user_state([0, 1])
    k = next(iter(after))
    assert torch.equal(after[k][1], before[k][1]) and not torch.equal(after[k][0], before[k][0])


def test_freeze_users_at_snapshot_then_unfreeze():
    """Early stopping's moves: pin users at a saved (best) snapshot, train, unfreeze one."""
    pm, _ = trained_user_model()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)

    def steps(users, n=2):
        for i in range(n):
            ids = torch.tensor(rand_seqs([6] * len(users), seed=i))
            opt.zero_grad()
            pm(input_ids=ids, labels=ids, user_ids=users).loss.backward()
            opt.step()
            pm.restore_frozen_users()

    best = pm.get_user_state([2, 1])                    # "best epoch" rows, in that order
    steps([0, 1, 2, 3])
    moved = pm.get_user_state([1, 2])
    k = next(iter(moved))
    assert not torch.equal(moved[k][0], best[k][1])
    pm.freeze_users([2, 1], state=best)                 # written back and pinned
    assert pm.frozen_users == [1, 2]
    assert all(torch.equal(pm.get_user_state([2, 1])[key], v) for key, v in best.items())
    steps([0, 1, 2, 3])                                  # momentum still moves rows 1, 2: restored
    now = pm.get_user_state([2, 1])
    assert all(torch.equal(now[key], v) for key, v in best.items())

    pm.unfreeze_users([1])
    assert pm.frozen_users == [2]
    steps([1, 2])
    now = pm.get_user_state([1, 2])
    assert not torch.equal(now[k][0], best[k][1]) and torch.equal(now[k][1], best[k][0])
    pm.unfreeze_users()
    assert pm.frozen_users == []
    pm.restore_frozen_users()                            # nothing frozen: a no-op
    with pytest.raises(ValueError, match="unknown user"):
        pm.freeze_users([7])


# ---------------------------------------------------------------------- persistence
def test_save_load_bit_exact(tmp_path):
    pm, orig = trained_user_model()
    pm.add_users(1)
    ids, mask, pos = left_pad(rand_seqs([6, 9, 7]))
    users = [4, 1, -1]
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=users).logits
    pm.save_pretrained(tmp_path / "full")
    pm2 = ProperModel.from_pretrained(copy.deepcopy(orig), tmp_path / "full")
    assert pm2.stage == "user" and pm2.num_users == 5 and pm2.population_merged
    with torch.no_grad():
        got = pm2(input_ids=ids, attention_mask=mask, position_ids=pos, user_ids=users).logits
    assert torch.equal(got, want)
    assert pm2.num_trainable_parameters() == pm.num_trainable_parameters()

    # one user alone: small, nothing shared, loadable at another id
    pm.save_pretrained(tmp_path / "u1", users=[1])
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "u1" / "proper_adapter.safetensors").keys()
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


def test_save_load_in_population_stage(tmp_path):
    base = tiny_model()
    orig = copy.deepcopy(base)
    pm = get_proper_model(base, config())
    pm.set_stage("population")
    randomize(pm)
    pm.save_pretrained(tmp_path)
    pm2 = ProperModel.from_pretrained(orig, tmp_path)
    ids = torch.tensor(rand_seqs([7]))
    assert torch.equal(pm(input_ids=ids).logits, pm2(input_ids=ids).logits)
    assert pm2.stage == "population" and not pm2.population_merged


# ---------------------------------------------------------------------- PEFT
def _peft_model(base, r, seed=5, alpha=None):
    peft = pytest.importorskip("peft")
    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=["gate_proj", "up_proj", "down_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_peft_import_population_and_user(tmp_path):
    orig = tiny_model()
    pmodel = _peft_model(copy.deepcopy(orig), r=4, alpha=4)
    pmodel.save_pretrained(tmp_path / "peft")
    ids = torch.tensor(rand_seqs([7, 7]))
    with torch.no_grad():
        want = pmodel(input_ids=ids).logits

    pm = get_proper_model(copy.deepcopy(orig), config(population_rank=4))
    pm.set_stage("population")
    pm.load_peft_adapter(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    # as user 2's adapter (different alpha: B is rescaled), experts off
    pm = get_proper_model(copy.deepcopy(orig), config(population_rank=0, user_rank=4))
    pm.set_stage("group")
    pm.set_stage("user")
    pm.load_peft_adapter(tmp_path / "peft", user=2)
    for _, layer in pm.adapted_layers():
        layer.use_experts = False
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, user_ids=[2, 2]).logits, want, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="rank 4 != user_rank 2"):
        pm2 = get_proper_model(copy.deepcopy(orig), config(user_rank=2))
        pm2.load_peft_adapter(tmp_path / "peft", user=0)
    with pytest.raises(ValueError, match="population_rank"):
        get_proper_model(copy.deepcopy(orig), config(population_rank=8)).load_peft_adapter(tmp_path / "peft")


@pytest.mark.parametrize("include_population", [True, False])
def test_peft_export_user_loads_in_peft(tmp_path, include_population):
    peft = pytest.importorskip("peft")
    pm, orig = trained_user_model()
    pm.export_peft_user(tmp_path, 3, include_population=include_population)
    ids = torch.tensor(rand_seqs([7, 5 + 2]))
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


# ---------------------------------------------------------------------- training
def _corpus(n=32, L=10, seed=0):
    """Two users with opposite token preferences: user 0 counts up, user 1 counts down."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        u = i % 2
        start = int(torch.randint(10, 80, (1,), generator=g))
        step = 1 if u == 0 else -1
        rows.append({"input_ids": torch.tensor([start + step * j for j in range(L)]), "user_ids": u})
    return rows


def _collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "user_ids": torch.tensor([r["user_ids"] for r in rows])}


def _eval_loss(pm, rows):
    b = _collate(rows)
    with torch.no_grad():
        return pm(**b).loss.item()


def test_trainer_lowers_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = get_proper_model(tiny_model(), config(num_users=2, balance_weight=0.01, diversity_weight=0.01))
    pm.set_stage("group")
    data = _corpus()
    before = _eval_loss(pm, data)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                             learning_rate=5e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=pm, args=args, train_dataset=data, data_collator=_collate).train()
    after = _eval_loss(pm, data)
    assert after < before - 0.1, (before, after)


def test_gradient_checkpointing_keeps_routing_for_recompute():
    pm, _ = trained_user_model()
    pm.train()
    ids = torch.tensor(rand_seqs([8, 8, 8], seed=2))
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
    pm.clear_routing()
    pm.gradient_checkpointing_disable()
    torch.testing.assert_close(loss1, loss0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_torch_compile_forward():
    pm, _ = trained_user_model()
    ids = torch.tensor(rand_seqs([6, 6], seed=4))
    compiled = torch.compile(pm, backend="eager")
    with torch.no_grad():
        for users in ([1, 2], [3, -1], [0, 0]):  # a new routing each call: same graph, right users
            want = pm(input_ids=ids, user_ids=users).logits
            got = compiled(input_ids=ids, user_ids=users).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    base = tiny_model()
    pm = get_proper_model(base, config())
    ids = torch.tensor(rand_seqs([5, 5]))
    with pytest.raises(ValueError, match="stage must be one of"):
        pm.set_stage("users")
    with pytest.raises(RuntimeError, match="user stage before group stage"):
        pm.set_stage("user")
    pm.set_stage("group")
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
    with pytest.raises(RuntimeError, match="already merged"):
        pm.set_stage("population")
    with pytest.raises(ValueError, match="num_experts > 0"):
        get_proper_model(tiny_model(), config(num_experts=0)).set_stage("group")
    with pytest.raises(ValueError, match="num_users > 0"):
        get_proper_model(tiny_model(), config(num_experts=0, num_users=0)).set_stage("user")
