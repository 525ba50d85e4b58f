"""``python -m proper_kernels.train`` end to end on CPU: a LaMP-format fixture made here
(30 users with Pareto history sizes; LaMP-2 classification and LaMP-5 generation), a
tiny random Llama and a byte-level BPE tokenizer trained offline on the fixture text.
The CLI runs in-process through ``main(argv)``."""
import json
import os

import pytest
import torch

from proper_kernels.train import main
from proper_kernels.train.data import read_lamp
from proper_kernels.train.engine import Codec, example_losses
from proper_kernels.train.synthetic import dataset_texts, write_lamp_task, write_tiny_model

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")
pytest.importorskip("sklearn")

STAGES = ("population", "group", "user")
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    lamp2 = write_lamp_task(str(root / "LaMP-2"), "LaMP-2", num_users=30, seed=0)
    lamp5 = write_lamp_task(str(root / "LaMP-5"), "LaMP-5", num_users=30, seed=1)
    model = write_tiny_model(str(root / "model"), dataset_texts(lamp2) + dataset_texts(lamp5), seed=0)
    return {"root": root, "lamp2": lamp2, "lamp5": lamp5, "model": model}


def _args(work, data, out, *extra):
    return ["--model", work["model"], "--data", data, "--output", str(out), "--quick", "--threads", "1",
            "--max-length", str(MAX_LENGTH), "--batch-size", "16", "--eval-batch-size", "32", "--lr", "3e-3",
            "--no-progress", *extra]


def _stat(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        return st.st_mtime_ns, f.read()


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _base(work):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(work["model"], local_files_only=True)


def test_codec_masks_prompts_truncates_and_pads(work):
    from transformers import AutoTokenizer

    from proper_kernels.train.data import Example
    from proper_kernels.train.engine import IGNORE, collate

    tok = AutoTokenizer.from_pretrained(work["model"], local_files_only=True)
    codec = Codec(tok, 16)
    short, long = Example("u", "hi", "comedy", "a"), Example("v", " ".join(["kalo"] * 40), "sci-fi", "b")
    enc = codec.encode([short, long], {"u": 0, "v": 1})
    target = tok(" comedy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(enc[0].ids) == tok("hi\nAnswer:")["input_ids"] + target
    assert enc[0].prompt_len == len(enc[0].ids) - len(target)
    assert enc[0].ids[0] == tok.bos_token_id and enc[1].user == 1
    # over max_length: the prompt keeps its start and its end (the answer cue), the target stays whole
    full = codec.prompt_ids(long.input)
    long_target = tok(" sci-fi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(enc[1].ids) == 16 and list(enc[1].ids[enc[1].prompt_len:]) == long_target
    head = enc[1].prompt_len // 2
    assert list(enc[1].ids[:head]) == full[:head]
    assert list(enc[1].ids[head:enc[1].prompt_len]) == full[len(full) - (enc[1].prompt_len - head):]
    ids, mask, labels, users = collate(enc, codec.pad_id, "cpu")
    assert labels[0, :enc[0].prompt_len].eq(IGNORE).all()
    assert labels[0, enc[0].prompt_len:len(enc[0].ids)].tolist() == target
    assert mask[0].sum() == len(enc[0].ids) and ids[0, len(enc[0].ids):].eq(codec.pad_id).all()
    left = collate(enc, codec.pad_id, "cpu", left=True, labels=False)
    assert left[2] is None and left[1][0, -len(enc[0].ids):].eq(1).all() and left[1][0, 0] == 0
    assert users.tolist() == [0, 1]
    # a chat template wraps the input as the user turn
    tok.chat_template = ("{% for m in messages %}<s>[{{ m['content'] }}]{% endfor %}"
                         "{% if add_generation_prompt %}=>{% endif %}")
    chat = Codec(tok, 64, chat_template=True)
    assert chat.prompt_text("hi") == "<s>[hi]=>" and chat.prompt_ids("hi")[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="must contain"):
        Codec(tok, 64, prompt_format="no slot")


def test_lamp_classification_stop_resume_and_checkpoints(work, capsys):
    from proper_kernels.integrations import ProperModel
    from transformers import AutoTokenizer

    out = work["root"] / "out2"
    assert main(_args(work, work["lamp2"], out, "--stop-after", "group")) == 0
    for s in ("population", "group"):
        assert os.path.isfile(out / s / "stage.json") and os.path.isfile(out / s / "proper_adapter.safetensors")
    assert not os.path.exists(out / "user")
    partial = _results(out)
    assert partial["pending"] == ["user"] and partial["stopped_after"] == "group"
    assert "not run yet: user" in (out / "results.md").read_text()
    kept = {p: _stat(out / s / p) for s in ("population", "group") for p in ("proper_adapter.safetensors",)}
    kept.update({f"{s}.json": _stat(out / s / "stage.json") for s in ("population", "group")})

    # the same output again without --resume is refused, with the way out in the message
    capsys.readouterr()
    assert main(_args(work, work["lamp2"], out)) == 2
    assert "--resume" in capsys.readouterr().err

    # a user stage killed while saving: files without stage.json are an incomplete stage, trained again
    (out / "user").mkdir()
    (out / "user" / "proper_adapter.safetensors").write_bytes(b"cut short")
    assert main(_args(work, work["lamp2"], out, "--resume")) == 0
    log = capsys.readouterr().out
    assert "resume: stages ['population', 'group'] are complete" in log
    assert "stage population" not in log and "stage group" not in log      # not retrained
    now = {p: _stat(out / s / p) for s in ("population", "group") for p in ("proper_adapter.safetensors",)}
    now.update({f"{s}.json": _stat(out / s / "stage.json") for s in ("population", "group")})
    assert now == kept

    res = _results(out)
    assert res["task"] == "LaMP-2" and res["kind"] == "classification" and res["pending"] == []
    assert list(res["stages"]) == ["base", *STAGES] and res["users"] == 30
    for name, st in res["stages"].items():
        m = st["metrics"]
        assert m["all"]["n"] == res["test_examples"] == sum(m[b]["n"] for b in ("sparse", "medium", "rich"))
        assert 0.0 <= m["all"]["accuracy"] <= 1.0 and 0.0 <= m["all"]["f1"] <= 1.0 and m["all"]["loss"] > 0
    user = res["stages"]["user"]["train"]
    assert user["users_above_start"] == 0 and sum(user["users_by_best_epoch"]) > 0
    # training lowered the teacher-forced test loss
    assert res["stages"]["user"]["metrics"]["all"]["loss"] < res["stages"]["base"]["metrics"]["all"]["loss"]
    md = (out / "results.md").read_text()
    for row in ("| base model |", "| + population |", "| + group |", "| + user (PROPER) |", "## accuracy",
                "## F1 (macro)", "## test loss"):
        assert row in md
    with open(out / "user" / "predictions.jsonl") as f:
        assert sum(1 for _ in f) == res["test_examples"]

    # every checkpoint loads on a fresh base and is the model that was evaluated
    tok = AutoTokenizer.from_pretrained(work["model"], local_files_only=True)
    ds = read_lamp(work["lamp2"])
    codec = Codec(tok, MAX_LENGTH)
    enc = codec.encode(ds.test, ds.user_index())
    for stage in STAGES:
        pm = ProperModel.from_pretrained(_base(work), str(out / stage))
        assert pm.stage == stage
        losses = example_losses(pm, enc, 32, codec.pad_id, with_users=stage != "population")
        want = res["stages"][stage]["metrics"]["all"]["loss"]
        assert sum(losses) / len(losses) == pytest.approx(want, rel=1e-5)

    # the resumed run trained its user stage exactly as an uninterrupted run does
    straight = work["root"] / "straight2"
    assert main(_args(work, work["lamp2"], straight, "--no-eval-base")) == 0
    assert _results(straight)["stages"]["user"]["metrics"] == res["stages"]["user"]["metrics"]


def test_lamp_generation_end_to_end(work):
    out = work["root"] / "out5"
    threads = torch.get_num_threads()
    assert main(_args(work, work["lamp5"], out, "--max-new-tokens", "8")) == 0
    assert torch.get_num_threads() == threads            # --threads 1 holds for the run only
    res = _results(out)
    assert res["task"] == "LaMP-5" and res["kind"] == "generation"
    assert res["metrics"] == ["rouge-1", "rouge-L", "loss"]
    for st in res["stages"].values():
        assert 0.0 <= st["metrics"]["all"]["rouge-1"] <= 1.0 and 0.0 <= st["metrics"]["all"]["rouge-L"] <= 1.0
    lamp = json.load(open(out / "user" / "lamp_predictions.json"))
    assert lamp["task"] == "LaMP_5" and len(lamp["golds"]) == res["test_examples"]
    assert {"id", "output"} == set(lamp["golds"][0])
    assert "## ROUGE-1" in (out / "results.md").read_text()


def test_jsonl_without_group_stage(work):
    ds = read_lamp(work["lamp5"])
    path = work["root"] / "lamp5.jsonl"
    with open(path, "w") as f:
        for split, exs in (("train", ds.train), ("test", ds.test)):
            for e in exs:
                f.write(json.dumps({"user_id": e.user, "input": e.input, "output": e.output, "split": split}) + "\n")
    out = work["root"] / "outj"
    assert main(_args(work, str(path), out, "--stages", "population,user", "--max-users", "10",
                      "--max-new-tokens", "4", "--no-eval-base")) == 0
    res = _results(out)
    assert list(res["stages"]) == ["population", "user"] and res["users"] == 10
    assert res["kind"] == "generation" and res["adapter_config"]["num_experts"] == 0
    assert "| + user (no group stage) |" in (out / "results.md").read_text()


def test_cli_reports_bad_files_and_arguments(work, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": 1, "input": "x", "split": "train"}) + "\n")
    assert main(["--model", work["model"], "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 1: missing field 'output'" in err
    assert main(["--model", str(tmp_path / "nomodel"), "--data", work["lamp2"], "--output", str(tmp_path / "o2")]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", work["model"], "--data", work["lamp2"], "--output", "o", "--stages", "user,nope"])
    assert main(["--model", work["model"], "--data", work["lamp2"], "--output", str(tmp_path / "o3"),
                 "--stages", "population,user", "--stop-after", "group"]) == 2
    assert "stop_after" in capsys.readouterr().err
