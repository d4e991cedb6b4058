"""Token-for-token parity with trl 1.16's DPOTrainer data pipeline.

One ``trl.DPOTrainer`` is built (tiny Llama from a config, explicit reference copy, the offline
tokenizer) with four data sets: real hh-rlhf rows (implicit prompt) as ``train_dataset`` and
synthetic explicit, conversational and implicit-conversational rows as ``eval_dataset``. Its
prepared ``prompt_ids``/``chosen_ids``/``rejected_ids`` under ``keep_start`` (which drops long
prompts) are compared with ``dpo_core.data.tokenize_rows`` row for row; a ``row_id`` column tells
which rows trl dropped. ``keep_end`` is checked by running the same trainer's ``_prepare_dataset``
with that one setting changed, rather than building a second trainer. Then our collator is compared
with trl's ``DataCollatorForPreference`` (the trainer's own, and keep_start / keep_end variants) on
these features.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dpo_core.collate import PreferenceCollator
from dpo_core.data import PROMPT_FILLS_MAX_LENGTH, tokenize_rows

os.environ["HF_HUB_OFFLINE"] = "1"

MAX_LENGTH = 96  # keeps about a third of the hh rows; short enough to build prompts around it
NAMES = ("hh", "explicit", "conversational", "conversational_implicit")

U = {"role": "user", "content": "What color is the sky?"}
A = {"role": "assistant", "content": "It is blue."}
B = {"role": "assistant", "content": "It is green, obviously."}
U2 = {"role": "user", "content": "Are you sure?"}
A2 = {"role": "assistant", "content": "Yes."}
B2 = {"role": "assistant", "content": "No"}
SYS = {"role": "system", "content": "Be brief."}


def prompts_around(tok, text: str, lengths: tuple[int, ...]) -> dict[int, str]:
    """For each target length n, the shortest character prefix of ``text`` that tokenizes to
    exactly n tokens."""
    found: dict[int, str] = {}
    for end in range(1, len(text) + 1):
        n = len(tok(text=text[:end])["input_ids"])
        if n in lengths and n not in found:
            found[n] = text[:end]
    assert set(found) == set(lengths), f"no prefix of {sorted(set(lengths) - set(found))} tokens"
    return found


def explicit_rows(tok, long_text: str) -> list[dict]:
    long = prompts_around(tok, long_text, (MAX_LENGTH - 1, MAX_LENGTH, MAX_LENGTH + 1))
    return [
        {
            "prompt": "The sky is b",
            "chosen": "lue",
            "rejected": "right",
        },  # merges across the boundary
        {"prompt": "Hu", "chosen": "man", "rejected": "go"},  # "Human" is one token
        {"prompt": "Human: What is 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " Five."},
        {"prompt": "", "chosen": "Hello", "rejected": "Bye"},  # empty prompt: BOS only
        {"prompt": "Q: ", "chosen": "yes</s>", "rejected": "no"},  # EOS already present
        {"prompt": "Say\n", "chosen": "ok\n\n", "rejected": "\tno "},
        {"prompt": "Café ", "chosen": "olé", "rejected": "😀!"},  # multi-byte characters
        {
            "prompt": long[MAX_LENGTH - 1],
            "chosen": " yes",
            "rejected": " no",
        },  # kept, truncated later
        {"prompt": long[MAX_LENGTH], "chosen": " yes", "rejected": " no"},  # dropped: == max_length
        {"prompt": long[MAX_LENGTH + 1], "chosen": "yes", "rejected": "no"},  # dropped
    ]


def conversational_rows(long_text: str) -> list[dict]:
    big = {"role": "user", "content": long_text}
    return [
        {"prompt": [U], "chosen": [A], "rejected": [B]},
        {"prompt": [SYS, U, A, U2], "chosen": [A2], "rejected": [B2]},
        {"prompt": [U], "chosen": [A, U2, A2], "rejected": [B]},
        {"prompt": [big], "chosen": [A], "rejected": [B]},  # dropped under keep_start
    ]


def conversational_implicit_rows(long_text: str) -> list[dict]:
    big = {"role": "user", "content": long_text}
    return [
        {"chosen": [U, A], "rejected": [U, B]},
        {"chosen": [SYS, U, A, U2, A2], "rejected": [SYS, U, A, U2, B2]},
        {"chosen": [U, A], "rejected": [U, A, U2, B2]},  # trl's split stops one message short
        {"chosen": [big, A], "rejected": [big, B]},  # dropped under keep_start
    ]


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, hh_rows, tmp_path_factory):
    """name -> (rows, trl keep_start data set, trl keep_end data set), and the trainer's collator."""
    import datasets
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM

    datasets.disable_progress_bars()
    tok = tiny_tokenizer
    long_text = hh_rows[0]["chosen"]
    rows = {
        "hh": hh_rows,
        "explicit": explicit_rows(tok, long_text),
        "conversational": conversational_rows(long_text),
        "conversational_implicit": conversational_implicit_rows(long_text),
    }
    sets = {
        name: datasets.Dataset.from_list([{**r, "row_id": i} for i, r in enumerate(rs)])
        for name, rs in rows.items()
    }
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to="none",
        bf16=False,
        use_cpu=True,
        max_length=MAX_LENGTH,
    )
    trainer = trl.DPOTrainer(
        model=LlamaForCausalLM(config),
        ref_model=LlamaForCausalLM(config),
        args=args,
        processing_class=copy.deepcopy(tok),
        train_dataset=sets["hh"],
        eval_dataset={name: sets[name] for name in NAMES[1:]},
    )
    keep_start = {"hh": trainer.train_dataset, **trainer.eval_dataset}
    keep_end_args = copy.copy(args)
    keep_end_args.truncation_mode = "keep_end"
    keep_end = {
        name: trainer._prepare_dataset(sets[name], trainer.processing_class, keep_end_args, name)
        for name in NAMES
    }
    columns = ["row_id", "prompt_ids", "chosen_ids", "rejected_ids"]
    data = {
        name: (
            rows[name],
            keep_start[name].select_columns(columns).to_list(),
            keep_end[name].select_columns(columns).to_list(),
        )
        for name in NAMES
    }
    return data, trainer.data_collator


def column(features: list[dict], key: str) -> list:
    return [f[key] for f in features]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("name", NAMES)
def test_token_ids_match_trl(prepared, tiny_tokenizer, name, mode):
    """Same kept rows, in the same order, with identical prompt/chosen/rejected ids."""
    data, _ = prepared
    rows, keep_start, keep_end = data[name]
    theirs = keep_start if mode == "keep_start" else keep_end
    ours = tokenize_rows(
        rows, tiny_tokenizer, max_length=MAX_LENGTH, truncation_mode=mode, source=name
    )
    assert column(ours.rows, "index") == column(theirs, "row_id")
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert column(ours.rows, key) == column(theirs, key), key
    # The filter is exercised under keep_start and idle under keep_end.
    dropped = ours.counts.get(PROMPT_FILLS_MAX_LENGTH, 0)
    assert (dropped > 0) if mode == "keep_start" else (dropped == 0)
    assert len(ours.rows) + dropped == len(rows)


def test_parity_cases_are_exercised(prepared, tiny_tokenizer):
    """The synthetic rows really hit what they are for: cross-boundary merges, and a prompt of
    exactly max_length tokens dropped while one token fewer is kept."""
    data, _ = prepared
    explicit = tokenize_rows(data["explicit"][0], tiny_tokenizer, max_length=MAX_LENGTH)
    assert explicit.num_boundary_merges >= 2
    assert explicit.dropped[PROMPT_FILLS_MAX_LENGTH] == [8, 9]
    kept_long = next(r for r in explicit.rows if r["index"] == 7)
    assert len(kept_long["prompt_ids"]) == MAX_LENGTH - 1
    hh = tokenize_rows(data["hh"][0], tiny_tokenizer, max_length=None)
    assert hh.num_boundary_merges > 0


@pytest.mark.parametrize(
    ("max_length", "mode"),
    [
        ("trainer", None),
        (None, "keep_start"),
        (40, "keep_start"),
        (40, "keep_end"),
        (3, "keep_end"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_collator_matches_trl(prepared, tiny_tokenizer, name, max_length, mode):
    """Our collator on our rows == trl's collator on trl's rows, batch by batch (8 pairs), with
    made-up reference logps passed through. "trainer" is the collator the trainer itself built."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    data, trainer_collator = prepared
    rows, keep_start, keep_end = data[name]
    if max_length == "trainer":
        theirs_collate, max_length, mode, features = (
            trainer_collator,
            MAX_LENGTH,
            "keep_start",
            keep_start,
        )
    else:
        theirs_collate = DataCollatorForPreference(tiny_tokenizer.pad_token_id, max_length, mode)
        features = keep_end  # all rows: nothing dropped
    ours_rows = tokenize_rows(
        rows, tiny_tokenizer, max_length=MAX_LENGTH, truncation_mode="keep_end"
    ).rows
    kept = set(column(features, "row_id"))
    ours_rows = [r for r in ours_rows if r["index"] in kept]
    ours_collate = PreferenceCollator(tiny_tokenizer.pad_token_id, max_length, mode)
    for start in range(0, len(features), 8):
        want_features = [
            {**features[i], "ref_chosen_logps": -float(i), "ref_rejected_logps": -0.5 * i}
            for i in range(start, min(start + 8, len(features)))
        ]
        got_features = [
            {**r, "ref_chosen_logps": -float(i), "ref_rejected_logps": -0.5 * i}
            for i, r in enumerate(ours_rows[start : start + 8], start=start)
        ]
        want, got = theirs_collate(want_features), ours_collate(got_features)
        for key in (
            "input_ids",
            "attention_mask",
            "completion_mask",
            "ref_chosen_logps",
            "ref_rejected_logps",
        ):
            assert torch.equal(getattr(got, key), want[key]), (key, start)
        assert got.index.tolist() == [f["row_id"] for f in want_features]
