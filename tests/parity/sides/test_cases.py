"""Parity cases: validation, what trl 1.16 cannot compare, and the command line's expansion."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dpo_core.settings import LossSettings
from parity.check.cli import build_parser
from parity.sides.cases import LOSS_TYPES, ParityCase, case_name, cases_from_args, comparable
from training.base.config import flag


def cases(*argv: str) -> list[ParityCase]:
    return cases_from_args(build_parser().parse_args(list(argv)))


def test_defaults_give_one_comparable_llama_sigmoid_case():
    (case,) = cases()
    assert (case.arch, case.loss.loss_type, case.steps, case.learning_rate) == (
        "llama",
        ["sigmoid"],
        20,
        1e-3,
    )
    assert comparable(case) == (True, "")
    assert case.rows_needed == 20 * 4


def test_loss_type_all_gives_one_valid_case_per_loss_type():
    all_cases = cases("--loss-type", "all", "--arch", "llama", "gpt2")
    assert len(all_cases) == 2 * len(LOSS_TYPES)
    assert len({c.name for c in all_cases}) == len(all_cases)
    # Every loss type is runnable by trl with its default smoothing (exo_pair needs eps > 0).
    assert all(comparable(c)[0] for c in all_cases)
    smoothing = {c.loss.loss_type[0]: c.loss.label_smoothing for c in all_cases}
    assert smoothing["exo_pair"] > 0 and 0 < smoothing["robust"] < 0.5
    assert smoothing["sigmoid"] == 0.0


def test_several_loss_types_make_one_weighted_case():
    (case,) = cases("--loss-type", "sigmoid", "sft", "--loss-weights", "1", "0.5")
    assert case.loss.loss_type == ["sigmoid", "sft"] and case.loss.loss_weights == [1.0, 0.5]


def test_options_combine():
    (case,) = cases(
        "--lora", "--load-in-4bit", "--precompute-ref", "--grad-accum", "2", "--data",
        "conversational", "--max-length", "0", "--truncation-mode", "keep_end", "--ld-alpha", "0.5",
    )  # fmt: skip
    assert case.lora and case.load_in_4bit and case.precompute_ref and case.grad_accum == 2
    assert case.max_length is None and case.truncation_mode == "keep_end"
    assert case.loss.ld_alpha == 0.5
    (qlora,) = cases("--load-in-4bit")
    assert qlora.lora  # 4-bit weights are trained through LoRA


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--label-smoothing", "0.1"], "cDPO"),
        (["--reference-free"], "reference-free"),
        (["--loss-type", "exo_pair", "--label-smoothing", "0"], "exo_pair"),
        (["--loss-type", "nca_pair", "--f-divergence-type", "js_divergence"], "js_divergence"),
        (["--loss-type", "aot", "--use-weighting"], "WPO"),
        (["--loss-type", "sft", "--use-weighting"], "sft"),
        (["--lora", "--lora-target-modules", "q_proj", "lm_head"], "lm_head"),
    ],
)
def test_settings_trl_lacks_are_not_compared(argv, reason):
    (case,) = cases(*argv)
    ok, why = comparable(case)
    assert not ok and reason in why


def test_the_objective_flags_are_training_flags():
    """One flag per ``LossSettings`` field, spelled as ``python -m training.fit`` spells it, as
    are the run's flags training has (``--max-steps``, ``--gradient-accumulation-steps``,
    ``--precompute-ref-log-probs``; parity's short old spellings are aliases); no flag is taken
    by a prefix, and help shows training's names."""
    parser = build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    assert {flag(f.name) for f in dataclasses.fields(LossSettings)} <= options
    assert {"--max-steps", "--gradient-accumulation-steps", "--precompute-ref-log-probs"} <= options
    assert "--f-alpha" not in options and "--f-divergence" not in options
    with pytest.raises(SystemExit):  # a prefix of --f-alpha-divergence-coef is refused
        cases("--loss-type", "ipo", "--f-alpha", "0.3")
    (new,) = cases(
        "--loss-type", "ipo", "--f-divergence-type", "alpha_divergence",
        "--f-alpha-divergence-coef", "0.3", "--max-steps", "3", "--gradient-accumulation-steps",
        "2", "--precompute-ref-log-probs",
    )  # fmt: skip
    (old,) = cases(
        "--loss-type", "ipo", "--f-divergence-type", "alpha_divergence",
        "--f-alpha-divergence-coef", "0.3", "--steps", "3", "--grad-accum", "2", "--precompute-ref",
    )  # fmt: skip
    assert old == new and new.loss.f_alpha_divergence_coef == 0.3
    assert (new.steps, new.grad_accum, new.precompute_ref) == (3, 2, True)
    assert "--f-alpha-divergence-coef" in parser.format_help()


def test_unset_objective_flags_take_the_settings_defaults():
    (case,) = cases("--loss-type", "ipo", "--no-use-weighting")
    assert case.loss == LossSettings(loss_type=["ipo"])
    (case,) = cases("--use-weighting", "--ld-alpha", "0.5", "--beta", "0.2")
    assert (case.loss.use_weighting, case.loss.ld_alpha, case.loss.beta) == (True, 0.5, 0.2)


def test_the_name_lists_what_differs_from_the_defaults():
    (case,) = cases("--loss-type", "ipo", "--beta", "0.2", "--lora", "--steps", "3")
    assert case.name == case_name(case) == "llama-ipo-beta=0.2-steps=3-lora"


def test_a_case_survives_its_json_form():
    (case,) = cases("--loss-type", "sigmoid", "sft", "--loss-weights", "1", "0.5", "--lora")
    assert ParityCase.from_dict(json.loads(json.dumps(dataclasses.asdict(case)))) == case


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"loss": {"loss_type": ["dpo"]}}, "loss_type"),
        ({"loss": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "loss_weights"),
        ({"arch": "bert"}, "arch"),
        ({"truncation_mode": "middle"}, "truncation_mode"),
        ({"steps": 0}, "steps"),
        ({"load_in_4bit": True}, "LoRA"),
    ],
)
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        if "loss" in kwargs:
            kwargs["loss"] = LossSettings(**kwargs["loss"])
        ParityCase(name="bad", **kwargs)
