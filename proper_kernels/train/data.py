"""Reading user-history datasets: a plain JSONL, or the LaMP benchmark's files.

Both give a :class:`Dataset`: users (the order is the bank row of each), training
examples (each user's history) and test examples, all as (user, input, output).

* JSONL: one ``{"user_id": ..., "input": "...", "output": "...", "split": "train"|"test"}``
  per line. User ids are strings or ints, compared as strings (5 and "5" are one user).
* LaMP: ``{split}_questions.json`` (a list of questions ``{"id", "input", "profile": [items]}``)
  and ``{split}_outputs.json`` (``{"task": "LaMP_2", "golds": [{"id", "output"}]}``).
  A user's profile items become that user's training examples (see
  :mod:`proper_kernels.train.prompts`), their questions the test set. Questions carry
  no user id in LaMP: a question's ``user_id`` is used when present; otherwise a
  question whose profile is contained in another's (items equal as JSON) belongs to
  that user (a user with several questions has one growing profile), and each other
  question is a user of its own. A user's history is the items common to all its
  questions' profiles, so no question's answer is trained on.

Every problem with a file raises :class:`DataError` naming the file, the line or
record and the field.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .prompts import KINDS, LampTask, augment_with_profile, item_example, lamp_task, normalize_task_name, recent_order

__all__ = ["DataError", "Example", "Dataset", "read_jsonl", "read_lamp", "load_dataset", "infer_kind",
           "split_validation", "bucket_edges", "bucket_of", "BUCKETS"]

BUCKETS = ("sparse", "medium", "rich")
JSONL_FIELDS = ("user_id", "input", "output", "split")
T = TypeVar("T")


class DataError(ValueError):
    """A dataset file that cannot be read: the message names the file, the line or
    record, and what is wrong or missing."""


@dataclass(frozen=True)
class Example:
    """One (user, input, output) example; ``id`` names where it came from."""

    user: str
    input: str
    output: str
    id: str


@dataclass
class Dataset:
    """Users, their training history and the test examples of one dataset.

    ``users``: user keys in bank order (row i of the user bank is ``users[i]``).
    ``kind``: "classification", "rating" or "generation" (the metric family);
    ``labels``: the label set of a classification task. ``task``: the LaMP task name
    or the kind for a JSONL."""

    source: str
    task: str
    kind: str
    labels: Tuple[str, ...]
    users: List[str]
    train: List[Example]
    test: List[Example]
    notes: List[str] = field(default_factory=list)

    def user_index(self) -> Dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}

    def history_sizes(self) -> Dict[str, int]:
        """Training examples per user (0 for a user with test examples only)."""
        sizes = {u: 0 for u in self.users}
        for ex in self.train:
            sizes[ex.user] += 1
        return sizes


# ----------------------------------------------------------------------------- JSONL
def _user_key(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: user_id must be a string or an int, got {type(value).__name__} {value!r}")
    key = str(value).strip()
    if not key:
        raise DataError(f"{where}: user_id is empty")
    return key


def _output_text(value, where: str, name: str = "output") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {name} must be a string (or a number), got {type(value).__name__} {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: {name} is empty")
    return text


def infer_kind(outputs: Sequence[str]) -> str:
    """The metric family of a JSONL by its outputs: "rating" when every output is a
    finite number, "classification" when there are at most 20 distinct outputs and
    each appears twice on average, else "generation"."""
    def number(s):
        try:
            return math.isfinite(float(s))
        except ValueError:
            return False
    if outputs and all(number(o) for o in outputs):
        return "rating"
    distinct = set(outputs)
    if outputs and len(distinct) <= 20 and 2 * len(distinct) <= len(outputs):
        return "classification"
    return "generation"


def read_jsonl(path: str, task: Optional[str] = None, *, max_history: Optional[int] = None) -> Dataset:
    """Read a JSONL of ``{"user_id", "input", "output", "split"}`` lines (blank lines
    skipped). ``task``: "classification", "rating" or "generation" (default: by
    :func:`infer_kind`). Classification labels are the distinct outputs.
    ``max_history``: keep each user's last N training lines."""
    if task is not None and task not in KINDS:
        raise ValueError(f"task for a JSONL must be one of {KINDS} (or None to infer it), got {task!r}")
    name = os.path.basename(path)
    users: Dict[str, None] = {}
    train, test = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with fields {list(JSONL_FIELDS)}, "
                                f"got {type(rec).__name__}")
            missing = [k for k in JSONL_FIELDS if k not in rec]
            if missing:
                raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(m) for m in missing)} (each line needs {list(JSONL_FIELDS)})")
            user = _user_key(rec["user_id"], where)
            if not isinstance(rec["input"], str):
                raise DataError(f"{where}: input must be a string, got {type(rec['input']).__name__}")
            output = _output_text(rec["output"], where)
            split = rec["split"]
            if split not in ("train", "test"):
                raise DataError(f"{where}: split must be 'train' or 'test' (validation is carved from train), "
                                f"got {split!r}")
            users.setdefault(user, None)
            (train if split == "train" else test).append(Example(user, rec["input"], output, f"{name}:{lineno}"))
    if not train:
        raise DataError(f"{path}: no line has split 'train'")
    if max_history:
        seen: Dict[str, int] = {}
        for e in reversed(train):
            seen[e.user] = seen.get(e.user, 0) + 1
        keep = {u: n - max_history for u, n in seen.items()}  # how many of each user's first lines to drop
        kept = []
        for e in train:
            if keep[e.user] > 0:
                keep[e.user] -= 1
            else:
                kept.append(e)
        train = kept
    if not test:
        raise DataError(f"{path}: no line has split 'test'")
    kind = task or infer_kind([e.output for e in train + test])
    labels = tuple(sorted({e.output for e in train + test})) if kind == "classification" else ()
    if kind == "rating":
        for e in train + test:
            try:
                float(e.output)
            except ValueError:
                raise DataError(f"{path} line {e.id.rsplit(':', 1)[1]}: a rating task needs numeric outputs, "
                                f"got {e.output!r}") from None
    return Dataset(path, kind, kind, labels, list(users), train, test)


# ----------------------------------------------------------------------------- LaMP
def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _lamp_files(path: str, split: Optional[str]) -> Tuple[str, Optional[str], str]:
    """(questions file, outputs file or None, split) for a LaMP directory or questions file."""
    if os.path.isdir(path):
        if split is None:
            for s in ("dev", "test", "train"):
                if os.path.isfile(os.path.join(path, f"{s}_questions.json")) and \
                        os.path.isfile(os.path.join(path, f"{s}_outputs.json")):
                    split = s
                    break
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".json"))
                raise DataError(f"{path}: no LaMP split with both <split>_questions.json and <split>_outputs.json "
                                f"(found {found or 'no .json files'}); the test golds are needed for the metrics")
        q = os.path.join(path, f"{split}_questions.json")
    else:
        q = path
        m = re.match(r"(.*?)_questions\.json$", os.path.basename(path))
        if not m:
            raise DataError(f"{path}: a LaMP questions file is named <split>_questions.json")
        split = split or m.group(1)
    if not os.path.isfile(q):
        raise DataError(f"{q}: no such LaMP questions file")
    o = os.path.join(os.path.dirname(q), f"{split}_outputs.json")
    return q, (o if os.path.isfile(o) else None), split


def _group_users(questions: List[dict], item_keys: List[List[str]]) -> List[str]:
    """One user key per question: its "user_id" when it has one; else a question whose
    profile is contained in another question's profile (items equal as JSON; a
    user's profile only grows) is that user's too, keyed by the user's first
    question's id. Sharing a few items (co-authors' papers) does not join users.
    ``item_keys``: each question's profile items as canonical JSON."""
    keysets = [None if "user_id" in q else set(ks) for q, ks in zip(questions, item_keys)]
    holders: Dict[str, List[int]] = {}
    for i, ks in enumerate(keysets):
        for k in ks or ():
            holders.setdefault(k, []).append(i)
    parent = list(range(len(questions)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, ks in enumerate(keysets):
        if not ks:
            continue
        rarest = min(ks, key=lambda k: len(holders[k]))  # every superset of ks holds it too
        for j in holders[rarest]:
            if j != i and ks <= keysets[j]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    keys = []
    for i, q in enumerate(questions):
        if keysets[i] is None:
            keys.append(_user_key(q["user_id"], f"question {i} (id {q.get('id')!r})"))
        else:
            keys.append(f"q{questions[find(i)]['id']}")
    return keys


def _recent_items(items: List[dict], limit: Optional[int]) -> List[dict]:
    """The ``limit`` most recent ``items`` (see prompts.recent_order), in file order."""
    if not limit or len(items) <= limit:
        return items
    return [items[i] for i in sorted(recent_order(items)[:limit])]


def read_lamp(path: str, task: Optional[str] = None, split: Optional[str] = None, *, max_history: Optional[int] = None,
              retrieve: int = 0, retrieve_words: int = 50, seed: int = 0) -> Dataset:
    """Read one split of a LaMP task (``path``: the task's directory or its
    ``{split}_questions.json``; ``split`` default: dev, else test, else train, the
    first with both files).

    ``task``: "LaMP-1" .. "LaMP-7" (any spelling, e.g. "LaMP_2"); default: the
    outputs file's "task", else a LaMP name in the path. A LaMP-2 whose profile items
    have "category" rather than "tag" is the news release (LaMP-2N).
    ``max_history``: keep each user's most recent N profile items only (by "date" when
    every item has one, else the last in file order). ``retrieve``: put that many of
    the most recent profile items in front of every prompt, as LaMP's
    profile-augmented prompts do (0: the bare question, PROPER's setting): a question
    takes them from its own profile, a training example from its user's other items.
    """
    qpath, opath, split = _lamp_files(path, split)
    questions = _load_json(qpath)
    if not isinstance(questions, list):
        raise DataError(f"{qpath}: expected a JSON list of questions, got {type(questions).__name__}")
    if opath is None:
        raise DataError(f"{qpath}: no {split}_outputs.json next to it: the test golds are needed for the metrics "
                        "(LaMP publishes no golds for its test split: use dev)")
    outputs = _load_json(opath)
    if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
        raise DataError(f"{opath}: expected an object with a 'golds' list of {{'id', 'output'}}")
    golds: Dict[str, str] = {}
    for i, g in enumerate(outputs["golds"]):
        where = f"{opath} gold {i}"
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            missing = [k for k in ("id", "output") if not isinstance(g, dict) or k not in g]
            raise DataError(f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                            f"(each gold needs 'id', 'output')")
        golds[str(g["id"])] = _output_text(g["output"], f"{where} (id {g['id']!r})")

    for i, q in enumerate(questions):
        where = f"{qpath} question {i}" + (f" (id {q.get('id')!r})" if isinstance(q, dict) and "id" in q else "")
        if not isinstance(q, dict):
            raise DataError(f"{where}: expected an object with 'id', 'input', 'profile', got {type(q).__name__}")
        for k in ("id", "input", "profile"):
            if k not in q:
                raise DataError(f"{where}: missing field {k!r} (each question needs 'id', 'input', 'profile')")
        if not isinstance(q["input"], str):
            raise DataError(f"{where}: input must be a string, got {type(q['input']).__name__}")
        if not isinstance(q["profile"], list):
            raise DataError(f"{where}: profile must be a list of items, got {type(q['profile']).__name__}")
        if str(q["id"]) not in golds:
            raise DataError(f"{opath}: no gold output for question id {q['id']!r} ({qpath} question {i})")

    name = task or outputs.get("task")
    if name is None:
        m = re.search(r"lamp[_-]?([1-7])", qpath, flags=re.IGNORECASE)
        name = f"LaMP-{m.group(1)}" if m else None
    if name is None or normalize_task_name(name) is None:
        raise DataError(f"{qpath}: cannot tell which LaMP task this is (no 'task' in {opath}, no LaMP-N in the path): "
                        f"pass the task (LaMP-1 .. LaMP-7)")
    spec = lamp_task(name)
    if spec.name == "LaMP-2":
        first = next((it for q in questions for it in q["profile"] if isinstance(it, dict)), None)
        if first is not None and "category" in first and "tag" not in first:
            spec = lamp_task("LaMP-2N")
    _check_items(spec, questions, qpath)

    item_keys = [[json.dumps(it, sort_keys=True) for it in q["profile"]] for q in questions]
    keys = _group_users(questions, item_keys)
    # A user's history: the items common to all its questions' profiles. A later
    # question's profile may hold an earlier question's answer; the common part never does.
    common: Dict[str, set] = {}
    first: Dict[str, int] = {}
    for i, (key, iks) in enumerate(zip(keys, item_keys)):
        common[key] = common[key] & set(iks) if key in common else set(iks)
        first.setdefault(key, i)
    profiles: Dict[str, List[dict]] = {}
    for key, i in first.items():
        kept, done = [], set()
        for item, k in zip(questions[i]["profile"], item_keys[i]):
            if k in common[key] and k not in done:
                done.add(k)
                kept.append(item)
        profiles[key] = _recent_items(kept, max_history)
    users = list(profiles)

    rng = random.Random(seed)
    train: List[Example] = []
    titles = [(u, str(it["title"]).strip()) for u in users for it in profiles[u]] if spec.name == "LaMP-1" else []

    def foreign(u: str) -> List[str]:
        """One title of another user's paper (LaMP-1's unrelated candidate), or none."""
        for _ in range(32):
            v, t = titles[rng.randrange(len(titles))] if titles else (u, "")
            if v != u:
                return [t]
        return []

    skipped = 0
    for u in users:
        items = profiles[u]
        order = recent_order(items) if retrieve else []
        for j, item in enumerate(items):
            others = []
            if titles and len(items) > 1:  # LaMP-1: one other paper of the user, the related candidate
                k = rng.randrange(len(items) - 1)
                others = [items[k + (k >= j)]]
            ex = item_example(spec, item, others=others, foreign_titles=foreign(u) if titles else (), rng=rng)
            if ex is None or not ex[1]:
                skipped += 1
                continue
            inp = ex[0]
            if retrieve:  # the user's most recent items but this one
                recent = [items[i] for i in order[:retrieve + 1] if i != j][:retrieve]
                inp = augment_with_profile(spec, inp, recent, retrieve, retrieve_words)
            train.append(Example(u, inp, ex[1], f"profile:{item.get('id', f'{u}/{j}')}"))
    test = []
    for key, q in zip(keys, questions):
        inp = q["input"]
        if retrieve:  # from the question's own profile, as LaMP does
            inp = augment_with_profile(spec, inp, q["profile"], retrieve, retrieve_words)
        test.append(Example(key, inp, golds[str(q["id"])], str(q["id"])))
    notes = []
    if skipped:
        notes.append(f"{skipped} profile items made no training example (LaMP-1: a user's only paper, "
                     f"or an empty output)")
    if not train:
        raise DataError(f"{qpath}: the profiles give no training example")
    return Dataset(qpath, spec.name, spec.kind, spec.labels if spec.kind == "classification" else (), users, train,
                   test, notes)


def _check_items(spec: LampTask, questions: List[dict], qpath: str) -> None:
    for i, q in enumerate(questions):
        for j, item in enumerate(q["profile"]):
            where = f"{qpath} question {i} (id {q['id']!r}) profile item {j}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object, got {type(item).__name__}")
            for k in spec.fields:
                if item.get(k) is None:
                    raise DataError(f"{where}: missing field {k!r} ({spec.name} profile items need "
                                    f"{', '.join(repr(f) for f in spec.fields)})")


def load_dataset(path: str, task: Optional[str] = None, *, split: Optional[str] = None,
                 max_history: Optional[int] = None, retrieve: int = 0, retrieve_words: int = 50,
                 seed: int = 0) -> Dataset:
    """A JSONL file (``*.jsonl``) or a LaMP directory / questions file, by ``path``.
    ``task``: a LaMP task name, or a metric kind for a JSONL. ``max_history`` applies
    to both (see :func:`read_jsonl`, :func:`read_lamp`); ``split``, ``retrieve``,
    ``retrieve_words`` and ``seed`` are LaMP's."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isfile(path) and path.endswith(".jsonl"):
        if task is not None and normalize_task_name(task) is not None:
            raise DataError(f"{path}: a JSONL takes a metric kind {KINDS} as its task, not the LaMP task {task!r}")
        if split is not None or retrieve:
            raise DataError(f"{path}: the LaMP split and profile retrieval do not apply to a JSONL")
        return read_jsonl(path, task, max_history=max_history)
    if task is not None and normalize_task_name(task) is None:
        raise DataError(f"{path}: a LaMP dataset takes a LaMP task name (LaMP-1 .. LaMP-7), got {task!r}")
    return read_lamp(path, task, split, max_history=max_history, retrieve=retrieve, retrieve_words=retrieve_words,
                     seed=seed)


# ----------------------------------------------------------------------------- validation, buckets
def split_validation(items: Sequence[T], user_of: Callable[[T], object], frac: float = 0.2, max_val: int = 10,
                     seed: int = 0) -> Tuple[List[T], List[T]]:
    """Per-user validation split of training ``items``: a user with n >= 2 items gives
    clamp(round(frac * n), 1, min(max_val, n - 1)) of them to validation (so at least
    one stays for training); a user with fewer gives none. Its own RNG (seeded by
    ``seed``): other random streams are untouched. Returns (train, val), each in the
    order of ``items``."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"frac must be in [0, 1), got {frac!r}")
    rng = random.Random(1000003 + seed)
    by_user: Dict[object, List[int]] = {}
    for i, it in enumerate(items):
        by_user.setdefault(user_of(it), []).append(i)
    val_idx = set()
    for idx in by_user.values():
        n = len(idx)
        k = 0 if (n < 2 or frac == 0) else min(n - 1, max(1, min(max_val, round(frac * n))))
        val_idx.update(rng.sample(idx, k))
    return ([it for i, it in enumerate(items) if i not in val_idx],
            [it for i, it in enumerate(items) if i in val_idx])


def bucket_edges(sizes: Sequence[int], edges: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """(e1, e2): sparse is history <= e1 < medium <= e2 < rich. ``edges`` given: those;
    else the tertiles of ``sizes`` (one per user), so each bucket holds about a third
    of the users (ties at an edge go to the lower bucket)."""
    if edges is not None:
        e1, e2 = (float(e) for e in edges)
        if e1 > e2:
            raise ValueError(f"bucket edges must be ascending, got {list(edges)}")
        return e1, e2
    if not sizes:
        return 0.0, 0.0
    if len(sizes) == 1:
        return float(sizes[0]), float(sizes[0])
    q = statistics.quantiles(sorted(sizes), n=3, method="inclusive")
    return float(q[0]), float(q[1])


def bucket_of(n: float, edges: Tuple[float, float]) -> str:
    return "sparse" if n <= edges[0] else ("medium" if n <= edges[1] else "rich")
