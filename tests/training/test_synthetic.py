"""The synthetic controlled-sentiment task: its judge, its rows, its seeds and its splits."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from training.embedded.synthetic import (
    CONTINUING,
    DOMAINS,
    NEGATIVE,
    NEGATIVE_WORDS,
    POSITIVE,
    POSITIVE_WORDS,
    STANDALONE,
    SyntheticConfig,
    all_prompts,
    is_well_formed,
    judge,
    make_splits,
    sentiment_counts,
    win,
)

SMALL = SyntheticConfig(n_train=300, n_eval=60)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" The acting was superb.", 1.0),  # 1 positive, 0 negative
        (" The acting was dreadful.", 0.0),  # 0 positive, 1 negative
        (" Superb acting, but a DULL plot and awful music.", 0.0),  # 1 vs 2, case-insensitive
        (" A gem: lovely, though boring in places.", 1.0),  # 2 vs 1
        (" Lovely music, tedious plot.", 0.5),  # 1 vs 1: a tie
        (" We went on Tuesday.", 0.5),  # no sentiment word
        (" The superbly dullness.", 0.5),  # whole words only: neither word is in a lexicon
        ("", 0.5),
    ],
)
def test_judge_scores_known_completions(completion, expected):
    assert judge("Review of the film The Quiet Road:", completion) == expected


def test_judge_ignores_the_prompt():
    """The rule is about the completion: a negative opening does not make it negative."""
    assert judge("The dreadful, awful, boring film was", " lovely.") == 1.0


def test_judge_rejects_non_strings():
    with pytest.raises(TypeError, match="completion must be str"):
        judge("prompt", None)


def test_win_compares_two_completions():
    prompt = "My day at the zoo was"
    assert win(prompt, " lovely.", " dull.") == 1.0
    assert win(prompt, " dull.", " lovely.") == 0.0
    assert win(prompt, " lovely.", " superb.") == 0.5
    assert win(prompt, " quiet.", " calm.") == 0.5


def test_lexicons_are_paired_balanced_and_disjoint():
    """Equal sizes per slot kind keep a model trained on both responses at 50/50; disjoint
    lexicons and one-word lowercase entries keep the judge's count exact."""
    assert POSITIVE.keys() == NEGATIVE.keys()
    for kind in POSITIVE:
        assert len(POSITIVE[kind]) == len(NEGATIVE[kind]), kind
        assert len(set(POSITIVE[kind])) == len(POSITIVE[kind]), kind
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    assert all(re.fullmatch(r"[a-z]+", w) for w in POSITIVE_WORDS | NEGATIVE_WORDS)


def test_no_neutral_text_contains_a_sentiment_word():
    """Openings, subjects, aspects and skeletons are neutral: only slots carry sentiment."""
    neutral = list(STANDALONE + CONTINUING)
    for d in DOMAINS:
        neutral += list(d.openings) + list(d.subjects) + list(d.aspects)
    for text in neutral:
        assert sentiment_counts(text) == (0, 0), text


def test_every_skeleton_has_an_odd_number_of_sentiment_slots():
    """So a completion with randomly mixed slots is never a tie for the judge."""
    sentiment_fields = {"adj", "adj2", "adj3", "verb", "noun", "rec"}
    for skeleton in STANDALONE + CONTINUING:
        names = [f for _, f, _, _ in string.Formatter().parse(skeleton) if f]
        assert set(names) <= sentiment_fields | {"aspect", "aspect2"}, skeleton
        assert sum(n in sentiment_fields for n in names) % 2 == 1, skeleton


def _rows(splits):
    return [("train", r) for r in splits.train] + [("eval", r) for r in splits.eval]


def test_rows_are_valid_explicit_prompt_rows():
    splits = make_splits(SMALL, seed=0)
    assert (len(splits.train), len(splits.eval)) == (SMALL.n_train, SMALL.n_eval)
    for name, row in _rows(splits):
        assert set(row) == {"prompt", "chosen", "rejected"}, (name, row)
        assert all(isinstance(v, str) and v for v in row.values()), (name, row)
        assert row["prompt"] == row["prompt"].strip(), (name, row)
        for key in ("chosen", "rejected"):
            # A leading space and no trailing one: prompt + completion tokenises at the border.
            assert row[key].startswith(" ") and not row[key].startswith("  "), (name, key, row)
            assert row[key] == row[key].rstrip() and row[key][-1] in ".!", (name, key, row)
        assert judge(row["prompt"], row["chosen"]) == 1.0, (name, row)
        assert judge(row["prompt"], row["rejected"]) == 0.0, (name, row)


def test_chosen_and_rejected_differ_only_in_sentiment_words():
    """A minimal pair: masking the lexicon words leaves the same sentence."""

    def mask(text: str) -> str:
        words = POSITIVE_WORDS | NEGATIVE_WORDS
        return re.sub(r"[A-Za-z]+", lambda m: "_" if m[0].lower() in words else m[0], text)

    for name, row in _rows(make_splits(SMALL, seed=1)):
        assert mask(row["chosen"]) == mask(row["rejected"]), (name, row)
        assert row["chosen"] != row["rejected"], (name, row)


def test_every_row_is_well_formed():
    for name, row in _rows(make_splits(SMALL, seed=2)):
        for key in ("chosen", "rejected"):
            assert is_well_formed(row["prompt"], row[key]), (name, key, row)


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("My day at the zoo was", " lovely from start to finish.", True),
        ("Review of the film The Quiet Road:", " The acting was dull.", True),
        # Mixed sentiment is still a sentence of the task.
        (
            "Review of the film The Quiet Road:",
            " Overall a gem, with dull music and superb cast.",
            True,
        ),
        # A continuing skeleton after an opening that does not end in " was".
        ("Review of the film The Quiet Road:", " lovely from start to finish.", False),
        ("Review of the film The Quiet Road:", " The acting was was dull.", False),  # repetition
        (
            "Review of the film The Quiet Road:",
            " The acting was nice.",
            False,
        ),  # not a lexicon word
        ("Review of the film The Quiet Road:", " The acting was dull", False),  # cut short
        ("Review of the film The Quiet Road:", " The acting was dull. ", False),  # trailing text
    ],
)
def test_is_well_formed_by_hand(prompt, completion, expected):
    assert is_well_formed(prompt, completion) is expected


def test_generation_is_seeded():
    assert make_splits(SMALL, seed=3) == make_splits(SMALL, seed=3)
    assert make_splits(SMALL, seed=3) != make_splits(SMALL, seed=4)


def test_splits_are_disjoint_by_prompt():
    splits = make_splits(SMALL, seed=0)
    train_prompts = {r["prompt"] for r in splits.train}
    eval_prompts = {r["prompt"] for r in splits.eval}
    assert eval_prompts and not train_prompts & eval_prompts


def test_rows_are_varied():
    """Domains are drawn uniformly, every lexicon word is used, prompts are many."""
    rows = make_splits(SyntheticConfig(n_train=2000, n_eval=10), seed=0).train
    domain_of = {p: name for name, prompts in all_prompts().items() for p in prompts}
    counts = Counter(domain_of[r["prompt"]] for r in rows)
    assert set(counts) == {d.name for d in DOMAINS}
    # Uniform over 5 domains: 400 expected each; the binomial std is 18, so 300 is > 5 std away.
    assert min(counts.values()) > 300
    used = set(re.findall(r"[a-z]+", " ".join(r["chosen"] + r["rejected"] for r in rows)))
    assert used >= POSITIVE_WORDS | NEGATIVE_WORDS
    assert len({r["prompt"] for r in rows}) > 500


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_train"):
        SyntheticConfig(n_train=0)
    with pytest.raises(ValueError, match="eval_prompt_fraction"):
        SyntheticConfig(eval_prompt_fraction=1.0)
