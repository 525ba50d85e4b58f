"""proper_kernels.train.data and .prompts: the JSONL and LaMP readers, their error
messages, the LaMP task templates, the validation split and the user buckets."""
import json
import os
import random

import pytest

from proper_kernels.train.data import (DataError, bucket_edges, bucket_of, infer_kind, load_dataset, read_jsonl,
                                       read_lamp, split_validation)
from proper_kernels.train.prompts import (LAMP_TASKS, augment_with_profile, item_example, lamp_task,
                                          normalize_task_name)
from proper_kernels.train.synthetic import write_lamp_task


def _write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def _rec(user, inp, out, split):
    return {"user_id": user, "input": inp, "output": out, "split": split}


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_reads_users_in_order_with_string_and_int_ids(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [
        _rec("alice", "a1", "x", "train"), _rec(5, "b1", "y", "train"), "",
        _rec("5", "b2", "x", "train"), _rec("alice", "a2", "y", "test"), _rec(7, "c1", "x", "test"),
        _rec("alice", "a3", "x", "train")])
    ds = read_jsonl(path)
    assert ds.users == ["alice", "5", "7"]                       # 5 and "5" are one user
    assert [e.input for e in ds.train] == ["a1", "b1", "b2", "a3"]
    assert [(e.user, e.output) for e in ds.test] == [("alice", "y"), ("7", "x")]
    assert ds.history_sizes() == {"alice": 2, "5": 2, "7": 0}
    assert ds.kind == "classification" and ds.labels == ("x", "y")
    assert ds.train[2].id == "d.jsonl:4"                          # the blank line still counts


def test_jsonl_kind_inference_and_override(tmp_path):
    assert infer_kind(["1", "4", "5.0", "2"]) == "rating"
    assert infer_kind(["a", "b", "a", "b"]) == "classification"
    assert infer_kind(["one title", "another title", "a third"]) == "generation"
    path = _write_lines(tmp_path / "r.jsonl", [_rec(1, "i", 3, "train"), _rec(1, "j", 4.0, "test")])
    ds = read_jsonl(path)
    assert ds.kind == "rating" and [e.output for e in ds.train + ds.test] == ["3", "4"]
    assert read_jsonl(path, "generation").kind == "generation"
    with pytest.raises(ValueError, match="must be one of"):
        read_jsonl(path, "LaMP-2")


@pytest.mark.parametrize("line, message", [
    ('{"user_id": 1, "input": "a", "output": "b", "split": "train"', r"line 2: not valid JSON"),
    (_rec(1, "a", "b", "train") | {"output": None}, r"line 2: output must be a string"),
    ({"user_id": 1, "input": "a", "split": "train"}, r"line 2: missing field 'output'"),
    ({"input": "a", "split": "train"}, r"line 2: missing fields 'user_id', 'output'"),
    (_rec(1, "a", "b", "dev"), r"line 2: split must be 'train' or 'test'.*'dev'"),
    (_rec(1.5, "a", "b", "train"), r"line 2: user_id must be a string or an int, got float"),
    (_rec(True, "a", "b", "train"), r"line 2: user_id must be a string or an int, got bool"),
    (_rec(1, "a", "  ", "train"), r"line 2: output is empty"),
    (_rec(1, ["a"], "b", "train"), r"line 2: input must be a string"),
    ([1, 2], r"line 2: expected a JSON object"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = _write_lines(tmp_path / "bad.jsonl", [_rec(0, "ok", "fine", "test"), line])
    with pytest.raises(DataError, match=message) as e:
        read_jsonl(path)
    assert str(path) in str(e.value)


def test_jsonl_needs_both_splits_and_numeric_ratings(tmp_path):
    with pytest.raises(DataError, match="no line has split 'test'"):
        read_jsonl(_write_lines(tmp_path / "a.jsonl", [_rec(0, "a", "b", "train")]))
    with pytest.raises(DataError, match="line 2: a rating task needs numeric outputs, got 'high'"):
        read_jsonl(_write_lines(tmp_path / "b.jsonl", [_rec(0, "a", "1", "train"), _rec(0, "b", "high", "test")]),
                   "rating")


def test_jsonl_max_history_keeps_each_users_last_lines(tmp_path):
    recs = [_rec(u, f"{u}{i}", "o", "train") for i in range(4) for u in ("a", "b")] + [_rec("a", "t", "o", "test")]
    path = _write_lines(tmp_path / "h.jsonl", recs)
    ds = read_jsonl(path, max_history=3)
    assert [e.input for e in ds.train] == ["a1", "b1", "a2", "b2", "a3", "b3"]
    assert len(read_jsonl(path).train) == 8


def test_load_dataset_dispatch_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    path = _write_lines(tmp_path / "d.jsonl", [_rec(0, "a", "b", "train"), _rec(0, "a", "b", "test")])
    with pytest.raises(DataError, match="metric kind"):
        load_dataset(path, "LaMP-2")
    with pytest.raises(DataError, match="LaMP task name"):
        load_dataset(str(tmp_path), "generation")
    with pytest.raises(DataError, match="do not apply to a JSONL"):
        load_dataset(path, retrieve=2)


# ----------------------------------------------------------------------------- LaMP
@pytest.fixture(scope="module")
def lamp2(tmp_path_factory):
    return write_lamp_task(str(tmp_path_factory.mktemp("lamp") / "LaMP-2"), "LaMP-2", num_users=30, seed=1)


def test_lamp_reader_groups_users_and_builds_examples(lamp2):
    questions = json.load(open(os.path.join(lamp2, "dev_questions.json")))
    golds = {g["id"]: g["output"] for g in json.load(open(os.path.join(lamp2, "dev_outputs.json")))["golds"]}
    ds = read_lamp(lamp2)
    assert ds.task == "LaMP-2" and ds.kind == "classification" and ds.labels == LAMP_TASKS["LaMP-2"].labels
    assert len(questions) > 30 and len(ds.users) == 30          # a user's second question joins its first
    assert [e.id for e in ds.test] == [q["id"] for q in questions]
    assert [e.output for e in ds.test] == [golds[q["id"]] for q in questions]
    assert [e.input for e in ds.test] == [q["input"] for q in questions]  # a question is used as it is
    # training examples: the items common to all of a user's profiles (a later question's profile
    # holds the earlier question's answer, which is never trained on)
    items = {}
    for q, e in zip(questions, ds.test):
        mine = {json.dumps(p, sort_keys=True) for p in q["profile"]}
        items[e.user] = items[e.user] & mine if e.user in items else mine
    assert ds.history_sizes() == {u: len(v) for u, v in items.items()}
    answers = {(e.input.split("description: ")[1], e.output) for e in ds.test}
    assert not answers & {(e.input.split("description: ")[1], e.output) for e in ds.train}
    ex = ds.train[0]
    first = questions[0]["profile"][0]
    assert ex.output == first["tag"] and ex.input.endswith("description: " + first["description"])
    assert ex.input.startswith("Which tag does this movie relate to among the following tags?")
    assert ex.input == questions[0]["input"].split("description: ")[0] + "description: " + first["description"]


def test_lamp_reader_task_sources_and_user_id_field(tmp_path, lamp2):
    d = tmp_path / "plain"
    d.mkdir()
    qs = json.load(open(os.path.join(lamp2, "dev_questions.json")))[:4]
    for i, q in enumerate(qs):
        q["user_id"] = "u1" if i < 2 else 9
        q["profile"] = qs[i - i % 2]["profile"]          # a user's questions share its profile
    json.dump(qs, open(d / "dev_questions.json", "w"))
    json.dump({"golds": [{"id": q["id"], "output": "comedy"} for q in qs]}, open(d / "dev_outputs.json", "w"))
    with pytest.raises(DataError, match="cannot tell which LaMP task"):
        read_lamp(str(d))
    ds = read_lamp(str(d / "dev_questions.json"), "lamp_2")
    assert ds.users == ["u1", "9"] and len(ds.test) == 4
    # a task name in the path is enough
    named = tmp_path / "LaMP_2_user"
    os.rename(d, named)
    assert read_lamp(str(named)).task == "LaMP-2"


def test_lamp_users_join_by_contained_profiles_not_by_shared_items(tmp_path):
    item = lambda i: {"id": str(i), "text": f"review {i}", "score": 3}  # noqa: E731
    qs = [{"id": "a", "input": "q", "profile": [item(1), item(2)]},
          {"id": "b", "input": "q", "profile": [item(1), item(2), item(3)]},   # a's profile grown: a's user
          {"id": "c", "input": "q", "profile": [item(2), item(9)]},            # shares an item only: its own
          {"id": "d", "input": "q", "profile": [item(9)]},                     # within c's profile: c's user
          {"id": "e", "input": "q", "profile": []}]
    path = _lamp_dir(tmp_path, qs, [{"id": q["id"], "output": "3"} for q in qs])
    ds = read_lamp(path)
    assert [e.user for e in ds.test] == ["qa", "qa", "qc", "qc", "qe"]
    assert ds.history_sizes() == {"qa": 2, "qc": 1, "qe": 0}     # the items common to a user's profiles


def test_lamp_news_release_is_told_by_its_fields(tmp_path):
    d = tmp_path / "news"
    d.mkdir()
    q = {"id": "7", "input": "Which category does this article relate to ... article: x",
         "profile": [{"id": "1", "text": "markets fell", "title": "t", "category": "business"},
                     {"id": "2", "text": "a match", "title": "t2", "category": "sports"}]}
    json.dump([q], open(d / "dev_questions.json", "w"))
    json.dump({"task": "LaMP_2", "golds": [{"id": "7", "output": "business"}]}, open(d / "dev_outputs.json", "w"))
    ds = read_lamp(str(d))
    assert ds.task == "LaMP-2N" and "business" in ds.labels
    assert [e.output for e in ds.train] == ["business", "sports"]
    assert ds.train[0].input.endswith("article: markets fell")


def _lamp_dir(tmp_path, questions, golds, task="LaMP_3"):
    d = tmp_path / "x"
    d.mkdir(exist_ok=True)
    (d / "dev_questions.json").write_text(questions if isinstance(questions, str) else json.dumps(questions))
    if golds is not None:
        (d / "dev_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return str(d)


@pytest.mark.parametrize("questions, golds, message", [
    ([{"id": "1", "input": "q"}], [{"id": "1", "output": "3"}], r"question 0 \(id '1'\): missing field 'profile'"),
    ([{"id": "1", "input": "q", "profile": [{"id": "p", "text": "t", "score": 3}, {"id": "p2", "text": "t"}]}],
     [{"id": "1", "output": "3"}], r"question 0 \(id '1'\) profile item 1: missing field 'score' \(LaMP-3"),
    ([{"id": "1", "input": "q", "profile": []}], [{"id": "2", "output": "3"}],
     r"dev_outputs.json: no gold output for question id '1'"),
    ([{"id": "1", "input": "q", "profile": []}], [{"id": "1"}], r"dev_outputs.json gold 0: missing field 'output'"),
    ([{"id": "1", "input": 3, "profile": []}], [{"id": "1", "output": "3"}], r"question 0 \(id '1'\): input must"),
    ([{"id": "1", "input": "q", "profile": {}}], [{"id": "1", "output": "3"}], r"profile must be a list"),
    ("[{]", [], r"dev_questions.json: not valid JSON"),
    ({"id": "1"}, [], r"expected a JSON list of questions"),
    ([{"id": "1", "input": "q", "profile": []}], None, r"no LaMP split with both"),
])
def test_lamp_errors_name_file_record_and_field(tmp_path, questions, golds, message):
    path = _lamp_dir(tmp_path, questions, golds)
    with pytest.raises(DataError, match=message):
        read_lamp(path)


def test_lamp_questions_file_without_outputs_and_bad_name(tmp_path):
    path = _lamp_dir(tmp_path, [{"id": "1", "input": "q", "profile": []}], None)
    with pytest.raises(DataError, match="no dev_outputs.json next to it"):
        read_lamp(os.path.join(path, "dev_questions.json"))
    other = tmp_path / "questions.json"
    other.write_text("[]")
    with pytest.raises(DataError, match="named <split>_questions.json"):
        read_lamp(str(other))


def test_lamp1_pairs_a_users_papers_against_other_users_papers(tmp_path):
    qs = [{"id": "1", "input": 'For an author who has written the paper with the title "Q1", which reference is '
                                'related? Just answer with [1] or [2] without explanation. [1]: "a" [2]: "b"',
           "profile": [{"id": "11", "title": "A one", "abstract": "x"},
                       {"id": "12", "title": "A two", "abstract": "y"}]},
          {"id": "2", "input": "q2", "profile": [{"id": "21", "title": "B one", "abstract": "z"},
                                                 {"id": "22", "title": "B two", "abstract": "w"}]},
          {"id": "3", "input": "q3", "profile": [{"id": "31", "title": "C alone", "abstract": "v"}]}]
    path = _lamp_dir(tmp_path, qs, [{"id": q["id"], "output": "[1]"} for q in qs], task="LaMP_1")
    ds = read_lamp(path)
    assert ds.task == "LaMP-1" and ds.labels == ("[1]", "[2]") and len(ds.users) == 3
    assert [e.user for e in ds.train] == ["q1", "q1", "q2", "q2"]       # a single paper makes no pair
    assert ds.notes and "LaMP-1" in ds.notes[0]
    for e in ds.train:
        own = {"q1": ("A one", "A two"), "q2": ("B one", "B two")}[e.user]
        title = e.input.split('title "', 1)[1].split('"', 1)[0]
        other = own[1 - own.index(title)]
        cands = {"[1]": e.input.split('[1]: "')[1].split('"')[0], "[2]": e.input.split('[2]: "')[1].split('"')[0]}
        assert cands[e.output] == other
        wrong = cands["[2]" if e.output == "[1]" else "[1]"]
        assert wrong not in own and wrong in ("A one", "A two", "B one", "B two", "C alone")


def test_lamp_max_history_keeps_the_most_recent(tmp_path):
    items = [{"id": str(i), "text": f"review {i}", "score": 1 + i % 5, "date": f"2020-01-{10 + i:02d}"}
             for i in (5, 1, 3, 0, 4, 2)]
    path = _lamp_dir(tmp_path, [{"id": "q", "input": "review: x", "profile": items}], [{"id": "q", "output": "4"}])
    ds = read_lamp(path, max_history=2)
    assert sorted(e.input.rsplit(": ", 1)[1] for e in ds.train) == ["review 4", "review 5"]


# ----------------------------------------------------------------------------- prompts
def test_task_names():
    assert normalize_task_name("LaMP_2") == "LaMP-2" and normalize_task_name("lamp7") == "LaMP-7"
    assert normalize_task_name("LaMP-2N") == "LaMP-2N" and normalize_task_name("generation") is None
    with pytest.raises(ValueError, match="unknown LaMP task"):
        lamp_task("LaMP-9")


def test_item_templates_of_every_task():
    t = lambda n: LAMP_TASKS[n]  # noqa: E731
    assert item_example(t("LaMP-3"), {"text": "great", "score": 5.0}) == (
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
        "without further explanation. review: great", "5")
    assert item_example(t("LaMP-4"), {"text": "body", "title": "Head"}) == (
        "Generate a headline for the following article: body", "Head")
    assert item_example(t("LaMP-5"), {"abstract": "We show", "title": "T"}) == (
        "Generate a title for the following abstract of a paper: We show", "T")
    assert item_example(t("LaMP-6"), {"text": "hi all", "title": "Meeting"}) == (
        "Generate a subject for the following email: hi all", "Meeting")
    assert item_example(t("LaMP-7"), {"text": "my tweet"})[1] == "my tweet"
    inp, out = item_example(t("LaMP-2"), {"description": "a heist", "tag": "action"})
    assert out == "action" and "tags: [sci-fi, based on a book," in inp and inp.endswith("description: a heist")
    # LaMP-1: the related candidate is the user's own other paper, at the answer's position
    rng = random.Random(0)
    answers = set()
    for _ in range(20):
        inp, out = item_example(t("LaMP-1"), {"title": "Mine"}, others=[{"title": "My other"}],
                                foreign_titles=["Theirs"], rng=rng)
        assert inp.startswith('For an author who has written the paper with the title "Mine", which reference')
        pos = {"[1]": inp.index('[1]: "'), "[2]": inp.index('[2]: "')}
        related = inp.index('"My other"')
        assert related > pos[out] and (out == "[2]" or related < pos["[2]"])
        answers.add(out)
    assert answers == {"[1]", "[2]"}
    assert item_example(t("LaMP-1"), {"title": "Alone"}, others=[], foreign_titles=["x"]) is None


def test_profile_augmented_prompts():
    prof = [{"title": "Old", "abstract": "a b c d", "date": "2019-01-01"},
            {"title": "New", "abstract": "e f g h", "date": "2021-05-01"},
            {"title": "Mid", "abstract": "i j", "date": "2020-03-01"}]
    q5 = "Generate a title for the following abstract of a paper: x"
    got = augment_with_profile(LAMP_TASKS["LaMP-5"], q5, prof, 2, max_words=2)
    assert got == f'"New" is a title for "e f" , and "Mid" is a title for "i j" . Following the given patterns {q5}'
    q1 = 'For an author who has written the paper with the title "T", which reference is related?'
    got = augment_with_profile(LAMP_TASKS["LaMP-1"], q1, prof, 1)
    assert got.startswith('For an author who has written the paper with the title, and "New" "T", which')
    assert augment_with_profile(LAMP_TASKS["LaMP-3"], "q", [], 3) == "q"


# ----------------------------------------------------------------------------- split, buckets
def test_split_validation_per_user_rule():
    items = [(u, i) for u, n in (("a", 1), ("b", 2), ("c", 10), ("d", 100)) for i in range(n)]
    train, val = split_validation(items, lambda x: x[0], frac=0.2, max_val=10, seed=3)
    count = lambda xs, u: sum(1 for x in xs if x[0] == u)  # noqa: E731
    assert [count(val, u) for u in "abcd"] == [0, 1, 2, 10]
    assert [count(train, u) for u in "abcd"] == [1, 1, 8, 90]
    assert sorted(train + val) == sorted(items)
    assert split_validation(items, lambda x: x[0], 0.2, 10, seed=3) == (train, val)
    assert split_validation(items, lambda x: x[0], 0.2, 10, seed=4) != (train, val)
    with pytest.raises(ValueError, match="frac"):
        split_validation(items, lambda x: x[0], frac=1.0)


def test_bucket_edges_and_buckets():
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    e = bucket_edges(sizes)
    assert [bucket_of(n, e) for n in sizes].count("sparse") == 3
    assert [bucket_of(n, e) for n in sizes].count("rich") == 3
    assert bucket_edges(sizes, (6, 24)) == (6.0, 24.0)
    assert [bucket_of(n, (6, 24)) for n in (6, 7, 24, 25)] == ["sparse", "medium", "medium", "rich"]
    with pytest.raises(ValueError, match="ascending"):
        bucket_edges(sizes, (5, 2))
