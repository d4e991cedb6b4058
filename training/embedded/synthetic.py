"""A generated preference task with a checkable rule: controlled sentiment.

The DPO paper's first experiment (Rafailov et al., 2023, §6.1 "controlled sentiment
generation") asks a model to continue the opening of a review so that the continuation is
positive. This module builds that task from word lists, so it runs with no network and its
"reward model" is exact:

- a **prompt** is an opening, from one of five domains (films, days out, books, restaurants,
  products), e.g. ``"Review of the film The Silver River:"`` or ``"My day at the zoo was"``;
- the **chosen** and **rejected** completions share one sentence skeleton with slots; every
  sentiment slot of ``chosen`` is filled from the positive lexicon, every one of ``rejected``
  from the negative lexicon (independently drawn words), e.g.
  ``" What a gem! The acting was superb, and I would gladly recommend it."`` vs
  ``" What a mess! The acting was dreadful, and I would never recommend it."``;
- the **judge** counts lexicon words: a completion has the preferred property when it holds
  more positive than negative words. ``is_well_formed`` checks, apart from sentiment, that a
  sample is a sentence the task could have written (a measure of fluency).

The pair differs only in the property under test, so held-out accuracy measures whether a model
learned "positive is preferred", not which skeleton it prefers. Prompts are split between train
and held-out sets, so held-out prompts (and most of their word combinations) are unseen.

Completions start with a space and prompts do not end with one, so ``prompt + completion``
tokenises at the boundary exactly as the two parts do apart (trl concatenates the strings).
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass

# Paired sentiment lexicons: a slot of kind k takes a word from POSITIVE[k] in the chosen
# completion and from NEGATIVE[k] in the rejected one. Every word is lowercase, one word, and in
# no other list of this module (a test checks this), so the judge's count is exact.
POSITIVE: dict[str, tuple[str, ...]] = {
    "adj": (
        "wonderful", "delightful", "brilliant", "charming", "superb", "lovely", "excellent",
        "fantastic", "pleasant", "beautiful", "marvelous", "terrific", "splendid", "glorious",
        "enjoyable", "outstanding",
    ),
    "verb": ("loved", "enjoyed", "adored", "treasured", "admired", "relished"),
    "noun": ("joy", "delight", "pleasure", "treat", "triumph", "gem"),
    "rec": ("gladly", "happily", "eagerly", "warmly"),
}  # fmt: skip
NEGATIVE: dict[str, tuple[str, ...]] = {
    "adj": (
        "terrible", "awful", "dreadful", "boring", "horrible", "dull", "miserable",
        "disappointing", "bland", "tedious", "annoying", "unpleasant", "mediocre", "painful",
        "dismal", "atrocious",
    ),
    "verb": ("hated", "disliked", "loathed", "regretted", "resented", "despised"),
    "noun": ("mess", "chore", "disaster", "letdown", "failure", "bore"),
    "rec": ("never", "hardly", "reluctantly", "grudgingly"),
}  # fmt: skip
POSITIVE_WORDS = frozenset(w for words in POSITIVE.values() for w in words)
NEGATIVE_WORDS = frozenset(w for words in NEGATIVE.values() for w in words)

# Sentence skeletons. ``{adj}``, ``{adj2}``, ``{adj3}``, ``{verb}``, ``{noun}``, ``{rec}`` are
# sentiment slots; ``{aspect}``, ``{aspect2}`` take two different aspects of the prompt's domain
# and are the same in chosen and rejected. Every skeleton has an odd number of sentiment slots
# (1 or 3), so a completion whose slots were filled at random is never a tie for the judge: a
# starting model that has not yet learned to keep one sentiment through a sentence still scores
# 0 or 1. An opening that ends in " was" takes a CONTINUING skeleton (it completes that
# sentence); any other opening takes a STANDALONE one.
STANDALONE = (
    " It was {adj} from start to finish; I {verb} every minute and would {rec} go again.",
    " The {aspect} was {adj}, the {aspect2} was {adj2}, and I {verb} it.",
    " I {verb} it. The {aspect} felt {adj}, a real {noun}.",
    " What a {noun}! The {aspect} was {adj}, and I would {rec} recommend it.",
    " Simply {adj}, from the {aspect} to the {aspect2}.",
    " Honestly, the whole thing was {adj}, the {aspect} was {adj2} and the {aspect2} was {adj3}.",
    " My friends and I {verb} the {aspect}; it was {adj}, a real {noun}.",
    " Overall a {noun}, with {adj} {aspect} and {adj2} {aspect2}.",
    " The {aspect} was {adj}.",
    " Everyone around me {verb} it.",
)
CONTINUING = (
    " {adj}, the {aspect} was {adj2}, and the {aspect2} was {adj3}.",
    " {adj} from start to finish.",
    " truly a {noun}. The {aspect} was {adj} and I {verb} it.",
    " {adj}. I {verb} the {aspect} and would {rec} recommend it.",
    " a {noun} overall, with {adj} {aspect} and {adj2} {aspect2}.",
)

_TITLE_FIRST = (
    "Silver", "Midnight", "Hidden", "Northern", "Distant", "Winter", "Golden", "Quiet",
    "Crimson", "Iron", "Paper", "Glass",
)  # fmt: skip
_TITLE_SECOND = (
    "River", "Harbor", "Garden", "Mountain", "Letter", "Kingdom", "Station", "Forest", "Echo",
    "Lantern", "Island", "Road",
)  # fmt: skip
_TITLES = tuple(f"The {a} {b}" for a in _TITLE_FIRST for b in _TITLE_SECOND)
_OWNERS = ("Rosa", "Omar", "Lena", "Marco", "Aiko", "Priya", "Jonas", "Elena")
_KINDS = ("Kitchen", "Diner", "Bistro", "Grill", "Cafe", "Table")


@dataclass(frozen=True)
class Domain:
    """One kind of thing being reviewed.

    Attributes:
        name: a short label (``"film"``).
        openings: prompt patterns with a ``{subject}`` slot.
        subjects: what fills ``{subject}``.
        aspects: nouns the completion talks about (``{aspect}``, ``{aspect2}``).
    """

    name: str
    openings: tuple[str, ...]
    subjects: tuple[str, ...]
    aspects: tuple[str, ...]


DOMAINS = (
    Domain(
        "film",
        ("Review of the film {subject}:", "I watched {subject} last night.",
         "My thoughts on the movie {subject}:"),
        _TITLES,
        ("acting", "plot", "music", "ending", "dialogue", "cast", "pacing", "soundtrack"),
    ),
    Domain(
        "day",
        ("My day at the {subject} was", "We spent the weekend at the {subject}.",
         "Our trip to the {subject}:", "The afternoon at the {subject} was"),
        ("zoo", "beach", "museum", "park", "lake", "fair", "market", "aquarium", "castle",
         "festival", "farm", "pier"),
        ("weather", "food", "staff", "crowd", "view", "entrance", "parking", "guide"),
    ),
    Domain(
        "book",
        ("I just finished reading {subject}.", "Review of the novel {subject}:",
         "The book {subject} was"),
        _TITLES,
        ("story", "villain", "writing", "ending", "prose", "twist", "opening", "hero"),
    ),
    Domain(
        "restaurant",
        ("Dinner at {subject} tonight:", "We tried {subject} for lunch.",
         "The meal at {subject} was"),
        tuple(f"{o}'s {k}" for o in _OWNERS for k in _KINDS),
        ("food", "service", "dessert", "soup", "waiter", "wine", "bread", "coffee"),
    ),
    Domain(
        "product",
        ("Review of my new {subject}:", "I have used this {subject} for a week.",
         "The {subject} I bought was"),
        ("phone", "laptop", "blender", "bike", "camera", "kettle", "headset", "backpack", "lamp",
         "watch", "printer", "speaker"),
        ("design", "battery", "price", "build", "setup", "manual", "packaging", "size"),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticConfig:
    """How many rows the task has and how its prompts are split.

    Attributes:
        n_train: rows in the train split.
        n_eval: rows in the held-out split.
        eval_prompt_fraction: share of each domain's distinct prompts reserved for held-out rows.
    """

    n_train: int = 2000
    n_eval: int = 200
    eval_prompt_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError(f"SyntheticConfig: n_train and n_eval must be >= 1, got {self}")
        if not 0.0 < self.eval_prompt_fraction < 1.0:
            raise ValueError(
                "SyntheticConfig.eval_prompt_fraction must be in (0, 1), "
                f"got {self.eval_prompt_fraction}"
            )


@dataclass(frozen=True)
class Splits:
    """The task's rows: ``{"prompt", "chosen", "rejected"}`` dicts, disjoint by prompt."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]]


def sentiment_counts(completion: str) -> tuple[int, int]:
    """``(positive, negative)``: how many words of ``completion`` are in each lexicon.

    Words are maximal runs of ASCII letters, compared in lowercase.
    """
    words = re.findall(r"[a-z]+", completion.lower())
    return sum(w in POSITIVE_WORDS for w in words), sum(w in NEGATIVE_WORDS for w in words)


def judge(prompt: str, completion: str) -> float:
    """The task's reward: 1.0 if ``completion`` has more positive than negative lexicon words,
    0.0 if fewer, 0.5 on a tie (which includes text with no sentiment word at all).

    The prompt does not enter the rule (the task is to be positive whatever the opening); it is
    an argument so that every judge has the same signature. Exact and deterministic.
    """
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError(
            f"judge: prompt and completion must be str, got {type(prompt).__name__} "
            f"and {type(completion).__name__}"
        )
    pos, neg = sentiment_counts(completion)
    return 1.0 if pos > neg else 0.0 if neg > pos else 0.5


def win(prompt: str, completion: str, other: str) -> float:
    """Whether ``completion`` beats ``other`` under the judge: 1.0 win, 0.5 tie, 0.0 loss.

    Against a held-out rejected completion (judge 0) this is ``judge(prompt, completion)``
    except that a tie scores 0.5; averaged over prompts it is the usual win rate.
    """
    a, b = judge(prompt, completion), judge(prompt, other)
    return 1.0 if a > b else 0.0 if a < b else 0.5


def _skeleton_pattern(skeleton: str) -> re.Pattern[str]:
    """A regex for ``skeleton`` whose sentiment slots accept any lexicon word of their kind (of
    either polarity) and whose aspect slots accept any domain's aspect."""
    aspects = sorted({a for d in DOMAINS for a in d.aspects})
    choices = {k: POSITIVE[k] + NEGATIVE[k] for k in POSITIVE} | {"aspect": tuple(aspects)}
    parts = []
    for literal, name, _, _ in string.Formatter().parse(skeleton):
        parts.append(re.escape(literal))
        if name:  # adj2 -> adj, aspect2 -> aspect
            parts.append("(?:" + "|".join(choices[name.rstrip("23")]) + ")")
    return re.compile("".join(parts))


_STANDALONE_PATTERNS = tuple(_skeleton_pattern(s) for s in STANDALONE)
_CONTINUING_PATTERNS = tuple(_skeleton_pattern(s) for s in CONTINUING)


def is_well_formed(prompt: str, completion: str) -> bool:
    """Whether ``completion`` is, character for character, a sentence the task could write after
    ``prompt``: one of its skeletons (CONTINUING after an opening ending in " was", STANDALONE
    otherwise) with lexicon words in the sentiment slots (either polarity, mixed allowed) and
    aspects in the aspect slots. Measures fluency apart from sentiment, e.g. of samples.
    """
    patterns = _CONTINUING_PATTERNS if prompt.endswith(" was") else _STANDALONE_PATTERNS
    return any(p.fullmatch(completion) for p in patterns)


def all_prompts() -> dict[str, list[str]]:
    """Every distinct prompt of every domain, by domain name, in a fixed order."""
    return {d.name: [o.format(subject=s) for o in d.openings for s in d.subjects] for d in DOMAINS}


def split_prompts(rng: random.Random, eval_fraction: float) -> tuple[dict, dict]:
    """Shuffle each domain's prompts and give ``ceil(eval_fraction * n)`` of them to held-out.

    Returns:
        ``(train_prompts, eval_prompts)``, each ``{domain name: [prompt, ...]}``, disjoint.
    """
    train, held_out = {}, {}
    for name, prompts in all_prompts().items():
        prompts = prompts[:]
        rng.shuffle(prompts)
        k = min(len(prompts) - 1, max(1, math.ceil(eval_fraction * len(prompts))))
        held_out[name], train[name] = prompts[:k], prompts[k:]
    return train, held_out


def make_pair(rng: random.Random, domain: Domain, prompt: str) -> dict[str, str]:
    """One row: a skeleton filled twice, positive words for chosen, negative for rejected."""
    skeleton = rng.choice(CONTINUING if prompt.endswith(" was") else STANDALONE)
    aspect, aspect2 = rng.sample(domain.aspects, 2)

    def fill(lexicon: dict[str, tuple[str, ...]]) -> str:
        adj, adj2, adj3 = rng.sample(lexicon["adj"], 3)  # distinct where a skeleton has several
        return skeleton.format(  # unused keywords are ignored by str.format
            aspect=aspect,
            aspect2=aspect2,
            adj=adj,
            adj2=adj2,
            adj3=adj3,
            verb=rng.choice(lexicon["verb"]),
            noun=rng.choice(lexicon["noun"]),
            rec=rng.choice(lexicon["rec"]),
        )

    return {"prompt": prompt, "chosen": fill(POSITIVE), "rejected": fill(NEGATIVE)}


def make_rows(rng: random.Random, prompts: dict[str, list[str]], n: int) -> list[dict]:
    """``n`` rows; each picks a domain uniformly, then one of that domain's ``prompts``."""
    by_name = {d.name: d for d in DOMAINS}
    rows = []
    for _ in range(n):
        name = rng.choice(sorted(prompts))
        rows.append(make_pair(rng, by_name[name], rng.choice(prompts[name])))
    return rows


def make_splits(config: SyntheticConfig = SyntheticConfig(), *, seed: int = 0) -> Splits:
    """The train and held-out rows of the task, a pure function of ``config`` and ``seed``."""
    rng = random.Random(seed)
    train_prompts, eval_prompts = split_prompts(rng, config.eval_prompt_fraction)
    return Splits(
        train=make_rows(rng, train_prompts, config.n_train),
        eval=make_rows(rng, eval_prompts, config.n_eval),
    )
