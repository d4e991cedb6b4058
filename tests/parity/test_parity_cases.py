"""Parity in CI: trl 1.16's DPOTrainer and our Lightning path on the same tiny cases.

Each case trains both sides from the same files (policy, a *different* reference, the same
initial LoRA adapter, the same rows in the same order) and ``parity.compare`` checks every step
metric, the token ids, the dropped rows and the final weights against the tolerances documented
in ``parity/compare.py``. Steps are kept short (8) so the whole file fits the CI budget; the
20-step run is ``python -m parity --loss-type all --steps 20`` (see ``parity/README.md``).
"""

from __future__ import annotations

import dataclasses

import pytest

from dpo_core.losses import LOSS_TYPES
from dpo_core.settings import LossSettings
from parity.cases import ParityCase, comparable, default_label_smoothing
from parity.compare import compare_runs
from parity.ours_side import run_ours
from parity.trl_side import run_trl
from tests.conftest import HH_RLHF_FILE
from training.embedded.tokenizer import train_tokenizer  # noqa: F401  (imported for a clear ImportError)

STEPS = 8


LOSS_FIELDS = {f.name for f in dataclasses.fields(LossSettings)}


def _case(name: str, **kw) -> ParityCase:
    """A case of ``STEPS`` steps; keywords that name a ``LossSettings`` field go to its objective."""
    loss = {k: kw.pop(k) for k in list(kw) if k in LOSS_FIELDS}
    loss.setdefault("loss_type", ["sigmoid"])
    loss.setdefault("label_smoothing", default_label_smoothing(loss["loss_type"]))
    return ParityCase(name=name, loss=LossSettings(**loss), steps=kw.pop("steps", STEPS), **kw)


CASES = [_case(f"loss-{t}", loss_type=[t]) for t in LOSS_TYPES] + [
    _case("weighted-mpo", loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    _case("fdiv-forward_kl", f_divergence_type="forward_kl"),
    _case("fdiv-js", loss_type=["ipo"], f_divergence_type="js_divergence"),
    _case("fdiv-alpha", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    _case("wpo", use_weighting=True),
    _case("ld_alpha", ld_alpha=0.5),
    _case("lora", lora=True),
    # trl 1.16 stores QLoRA adapters in bf16; ours does too (qlora_adapter_dtype), and the
    # weights are then compared in bf16 ulps (parity/compare.py).
    _case("qlora-4bit", lora=True, load_in_4bit=True),
    _case("precompute-ref", precompute_ref=True),
    _case("grad-accum", batch_size=2, grad_accum=2),
    _case("keep_start", max_length=24),
    _case("keep_end", max_length=24, truncation_mode="keep_end"),
    _case("implicit-prompt", data="implicit"),
    _case("conversational", data="conversational"),
    _case("arch-qwen2", arch="qwen2"),
    _case("arch-gpt2", arch="gpt2"),
    _case("arch-mistral", arch="mistral"),
    _case("hh-rlhf", dataset_path=str(HH_RLHF_FILE), num_rows=16, max_length=192, steps=4),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_case(case: ParityCase, tmp_path):
    ok, why = comparable(case)
    assert ok, f"{case.name}: not comparable with trl 1.16: {why}"
    trl = run_trl(case, tmp_path)
    ours = run_ours(case, tmp_path)
    report = compare_runs(case.name, trl, ours)
    failures = [
        f"{c.name}: trl {c.trl_value} ours {c.ours_value} |diff| {c.max_diff:.3g} > {c.tolerance} {c.note}"
        for c in report.checks
        if not c.passed
    ]
    assert not failures, "\n".join(failures)
    assert len(trl.steps) == len(ours.steps) == case.steps


def test_reference_differs_from_policy(tmp_path):
    """Guard against a vacuous comparison: with reference == policy the step-1 sigmoid loss is
    log 2 whatever the log-probs; our parity reference is a perturbed copy, so it is not."""
    import math

    case = _case("guard", steps=1)
    trl = run_trl(case, tmp_path)
    assert abs(trl.steps[0]["loss"] - math.log(2)) > 1e-4


def test_cdpo_and_reference_free_are_reported_not_compared():
    assert comparable(_case("c", label_smoothing=0.1))[0] is False
    assert comparable(_case("r", reference_free=True))[0] is False
