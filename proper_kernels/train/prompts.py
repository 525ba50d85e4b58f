"""The LaMP tasks: what a question looks like, how a profile item becomes a training
example in the same form, which metric scores the task, and (optionally) the
profile-augmented prompt of the LaMP paper.

The question texts are the ones of the LaMP benchmark files (a question's ``input``
is used as it is); the profile-item templates rebuild that question around one item
of the user's history, so that the user's history trains exactly the task the test
questions ask:

=========  ==============  ===============================  ===================
task       kind            profile item fields              item -> (input, output)
=========  ==============  ===============================  ===================
LaMP-1     classification  title (abstract)                 pairwise (below)
LaMP-2     classification  description, tag                movie tagging
LaMP-2N    classification  text, category (title)           news categorisation
LaMP-3     rating          text, score                      review -> score
LaMP-4     generation      text, title                      article -> headline
LaMP-5     generation      abstract, title                  abstract -> title
LaMP-6     generation      text, title                      email -> subject
LaMP-7     generation      text                             (neutral) -> tweet
=========  ==============  ===============================  ===================

LaMP-1 profile items are papers of the user, with no citation choice of their own:
item i becomes the LaMP-1 question "which reference is related to <title i>?" with
the title of another paper of the same user (the related one) and the title of a
paper of another user as the two candidates, in random order. LaMP-7 items are the
user's tweets only: each is trained as the answer to a fixed neutral instruction.
LaMP-2N is the first release of LaMP-2 (news categories); files of either release
are told apart by their profile fields.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["LampTask", "LAMP_TASKS", "normalize_task_name", "lamp_task", "item_example", "augment_with_profile",
           "recent_order", "KINDS"]

KINDS = ("classification", "rating", "generation")

MOVIE_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
              "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story")
NEWS_CATEGORIES = ("women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
                   "science & technology", "travel", "business", "crime", "education", "healthy living", "parents",
                   "food & drink")

Q_CITATION = ('For an author who has written the paper with the title "{title}", which reference is related? '
              'Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"')
Q_MOVIE = ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
           "further explanation. tags: [{labels}] description: {description}")
Q_NEWS = ("Which category does this article relate to among the following categories? Just answer with the category "
          "name without further explanation. categories: [{labels}] article: {text}")
Q_REVIEW = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: {text}")
Q_HEADLINE = "Generate a headline for the following article: {text}"
Q_PAPER_TITLE = "Generate a title for the following abstract of a paper: {abstract}"
Q_EMAIL_SUBJECT = "Generate a subject for the following email: {text}"
TWEET_INSTRUCTION = "Write a tweet in your own words:"


@dataclass(frozen=True)
class LampTask:
    """One LaMP task: ``name`` ("LaMP-1" .. "LaMP-7", "LaMP-2N"), metric ``kind``
    (classification / rating / generation), the ``labels`` of a classification task,
    and the ``fields`` every profile item must have."""

    name: str
    kind: str
    labels: Tuple[str, ...]
    fields: Tuple[str, ...]
    description: str


LAMP_TASKS: Dict[str, LampTask] = {t.name: t for t in (
    LampTask("LaMP-1", "classification", ("[1]", "[2]"), ("title",), "personalized citation identification"),
    LampTask("LaMP-2", "classification", MOVIE_TAGS, ("description", "tag"), "personalized movie tagging"),
    LampTask("LaMP-2N", "classification", NEWS_CATEGORIES, ("text", "category"), "personalized news categorization"),
    LampTask("LaMP-3", "rating", ("1", "2", "3", "4", "5"), ("text", "score"), "personalized product rating"),
    LampTask("LaMP-4", "generation", (), ("text", "title"), "personalized news headline generation"),
    LampTask("LaMP-5", "generation", (), ("abstract", "title"), "personalized scholarly title generation"),
    LampTask("LaMP-6", "generation", (), ("text", "title"), "personalized email subject generation"),
    LampTask("LaMP-7", "generation", (), ("text",), "personalized tweet paraphrasing"),
)}


def normalize_task_name(name: str) -> Optional[str]:
    """"LaMP_2", "lamp-2", "LaMP2", "LaMP-2N" -> the LAMP_TASKS key; None if it is no LaMP name."""
    m = re.fullmatch(r"\s*lamp[\s_-]*([1-7])\s*(n|news)?\s*", str(name), flags=re.IGNORECASE)
    if not m:
        return None
    key = f"LaMP-{m.group(1)}" + ("N" if m.group(2) and m.group(1) == "2" else "")
    return key


def lamp_task(name: str) -> LampTask:
    key = normalize_task_name(name)
    if key is None or key not in LAMP_TASKS:
        raise ValueError(f"unknown LaMP task {name!r}: expected one of {sorted(LAMP_TASKS)}")
    return LAMP_TASKS[key]


def _text(item: dict, field: str) -> str:
    v = item.get(field)
    return "" if v is None else str(v).strip()


def _clip(text: str, max_words: Optional[int]) -> str:
    if not max_words:
        return text
    words = text.split()
    return " ".join(words[:max_words])


def item_example(task: LampTask, item: dict, *, others: Sequence[dict] = (), foreign_titles: Sequence[str] = (),
                 rng: Optional[random.Random] = None) -> Optional[Tuple[str, str]]:
    """The (input, output) training example of one profile ``item`` of ``task``, in
    the form of the task's questions; None when the item cannot make one (LaMP-1:
    no other paper of the user in ``others``, or no title of another user in
    ``foreign_titles``). ``rng`` draws LaMP-1's candidates and their order."""
    n = task.name
    if n == "LaMP-1":
        if not others or not foreign_titles:
            return None
        rng = rng or random.Random(0)
        related = _text(rng.choice(others), "title")
        unrelated = rng.choice(foreign_titles)
        if rng.random() < 0.5:
            return Q_CITATION.format(title=_text(item, "title"), ref1=related, ref2=unrelated), "[1]"
        return Q_CITATION.format(title=_text(item, "title"), ref1=unrelated, ref2=related), "[2]"
    if n == "LaMP-2":
        return Q_MOVIE.format(labels=", ".join(task.labels), description=_text(item, "description")), _text(item, "tag")
    if n == "LaMP-2N":
        return Q_NEWS.format(labels=", ".join(task.labels), text=_text(item, "text")), _text(item, "category")
    if n == "LaMP-3":
        score = item.get("score")
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        return Q_REVIEW.format(text=_text(item, "text")), str(score).strip()
    if n == "LaMP-4":
        return Q_HEADLINE.format(text=_text(item, "text")), _text(item, "title")
    if n == "LaMP-5":
        return Q_PAPER_TITLE.format(abstract=_text(item, "abstract")), _text(item, "title")
    if n == "LaMP-6":
        return Q_EMAIL_SUBJECT.format(text=_text(item, "text")), _text(item, "title")
    if n == "LaMP-7":
        return TWEET_INSTRUCTION, _text(item, "text")
    raise ValueError(f"no profile template for task {n!r}")


# ----------------------------------------------------------------------------- profile-augmented prompts
# The LaMP paper's retrieval-augmented prompt: the retrieved profile items, each as a
# short phrase, joined with ", and " in front of the question. LaMP cuts each item to
# a share of a token budget; here each item's long text is cut to ``max_words`` words.

def _phrase(task: LampTask, item: dict, max_words: Optional[int]) -> str:
    n = task.name
    if n == "LaMP-1":
        return f'"{_clip(_text(item, "title"), max_words)}"'
    if n == "LaMP-2":
        return f'the tag for the movie: "{_clip(_text(item, "description"), max_words)}" is "{_text(item, "tag")}" '
    if n == "LaMP-2N":
        text = _clip(_text(item, "text"), max_words)
        return f'the category for the article: "{text}" is "{_text(item, "category")}" '
    if n == "LaMP-3":
        return f'{_text(item, "score")} is the score for "{_clip(_text(item, "text"), max_words)}" '
    if n in ("LaMP-4", "LaMP-6"):
        return f'"{_text(item, "title")}" is the title for "{_clip(_text(item, "text"), max_words)}" '
    if n == "LaMP-5":
        return f'"{_text(item, "title")}" is a title for "{_clip(_text(item, "abstract"), max_words)}" '
    if n == "LaMP-7":
        return f'"{_clip(_text(item, "text"), max_words)}" '
    raise ValueError(f"no profile phrase for task {n!r}")


def recent_order(items: Sequence[dict]) -> List[int]:
    """Indices of ``items``, newest first: by their "date" when every item has one
    (LaMP's YYYY-MM-DD or any string of numbers), else by file order (last first)."""
    order = list(range(len(items)))[::-1]
    if items and all(item.get("date") not in (None, "") for item in items):
        def key(i):
            parts = re.findall(r"\d+", str(items[i]["date"]))
            return tuple(int(p) for p in parts) if parts else (0,)
        order = sorted(order, key=key, reverse=True)  # stable: equal dates keep last-first
    return order


def _recent(items: Sequence[dict], k: int) -> List[dict]:
    """The ``k`` most recent items, newest first (see :func:`recent_order`)."""
    if k <= 0:
        return []
    return [items[i] for i in recent_order(items)[:k]]


def augment_with_profile(task: LampTask, question: str, profile: Sequence[dict], k: int,
                         max_words: Optional[int] = 50) -> str:
    """The LaMP profile-augmented prompt of ``question``: its ``k`` most recent
    ``profile`` items (see :func:`_recent`) as the task's phrases in front of it. The
    question itself when ``k`` is 0 or the profile is empty."""
    chosen = _recent(profile, k)
    if not chosen:
        return question
    phrases = [_phrase(task, item, max_words) for item in chosen]
    joined = ", and ".join(phrases)
    if task.name == "LaMP-1":
        at = question.find("title")
        if at == -1:
            return question
        return question[:at + 5] + ", and " + joined + question[at + 5:]
    if task.name == "LaMP-5":
        return f"{joined}. Following the given patterns {question}"
    if task.name == "LaMP-7":
        return f"{joined} are written by a person. Following the given patterns {question}"
    return f"{joined}. {question}"
