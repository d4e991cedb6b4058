"""What a run shows while it works: the training bar counts optimizer steps to the run's total;
the evaluation's passes show bars on stderr even when it is not a terminal (a log file); the
evaluation's time is printed; and a start prints no warning that is not about the run."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from tests.training.conftest import base_args, fit
from training.eval.scoring import ModelView, score_completions
from training.inputs.model_loading import load_tokenizer
from training.run.quiet import BNB_CPU_LOGGER, BNB_KERNELS_NOTICE, quiet_foreign_warnings


def bar_counts(text: str, desc: str) -> list[str]:
    """The ``n/total`` of every redraw of the bar called ``desc``."""
    return re.findall(re.escape(desc) + r":[^|]*\|[^|]*\| (\d+/\d+)", text)


@pytest.fixture(autouse=True)
def _bars_on(monkeypatch):
    """Bars as a user sees them, whatever the environment says (CI may set TQDM_DISABLE)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_training_bar_counts_optimizer_steps_to_max_steps(tiny_assets, tmp_path, capsys):
    """32 rows in batches of 4 are 8 batches an epoch, 4 optimizer steps with accumulation 2:
    the bar counts to --max-steps 3, not to 8 batches."""
    fit(base_args(tiny_assets, tmp_path, max_steps=3, gradient_accumulation_steps=2))
    counts = bar_counts(capsys.readouterr().out, "Training")
    assert counts[-1] == "3/3"
    assert {c.split("/")[1] for c in counts} == {"3"}


def test_training_bar_spans_epochs(tiny_assets, tmp_path, capsys):
    """Two epochs of 8 batches: one count to 16."""
    fit(base_args(tiny_assets, tmp_path, max_steps=-1, num_train_epochs=2))
    assert bar_counts(capsys.readouterr().out, "Training")[-1] == "16/16"


def test_tqdm_disable_turns_the_training_bar_off(tiny_assets, tmp_path, capsys, monkeypatch):
    """``python -m parity`` sets TQDM_DISABLE=1 so that its table is not interleaved with bars."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fit(base_args(tiny_assets, tmp_path, max_steps=2))
    assert bar_counts(capsys.readouterr().out, "Training") == []


def test_evaluation_bars_show_on_a_non_terminal_stderr(tiny_assets, capsys):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_assets.model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    prompts = [tokenizer("Describe the cat.")["input_ids"]] * 3
    score_completions(ModelView(model), prompts, [[5, 6]] * 3, 0, batch_size=2, desc="KL: test")
    assert bar_counts(capsys.readouterr().err, "KL: test")[-1] == "3/3"


def test_a_run_prints_its_held_out_size_and_evaluation_time(tiny_assets, tmp_path, capsys, caplog):
    flags = {"evaluate": True, "eval_fraction": 0.25, "num_prompts": 2, "max_new_tokens": 3}
    with caplog.at_level(logging.INFO):
        fit(base_args(tiny_assets, tmp_path, max_steps=1, **flags))
    captured = capsys.readouterr()
    assert re.search(r"^evaluation: \d+ s \(CPU \d+ s\)$", captured.out, re.MULTILINE)
    assert "held-out: 8 pairs (25% of the 32 rows read" in caplog.text
    passes = ("held-out pairs (before = reference)", "held-out pairs (after)", "sampling (after)")
    for desc in (*passes, "KL: before"):
        assert bar_counts(captured.err, desc), desc


def test_foreign_warnings_are_silenced_and_others_kept():
    notices = logging.getLogger(BNB_CPU_LOGGER)
    before = list(notices.filters)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet_foreign_warnings(load_in_4bit=False)
            for message in (
                "`is_gradient_checkpointing` is deprecated and ...",
                "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                "something about this run",
            ):
                warnings.warn(message, FutureWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["something about this run"]
        kernels = logging.LogRecord(
            BNB_CPU_LOGGER, logging.WARNING, "", 0, BNB_KERNELS_NOTICE, (), None
        )
        other = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, "", 0, "other", (), None)
        assert not notices.filter(kernels) and notices.filter(other)
    finally:
        notices.filters[:] = before


def test_the_kernels_notice_stays_for_4_bit_runs():
    notices = logging.getLogger(BNB_CPU_LOGGER)
    before = list(notices.filters)
    try:
        with warnings.catch_warnings():
            quiet_foreign_warnings(load_in_4bit=True)
        kernels = logging.LogRecord(
            BNB_CPU_LOGGER, logging.WARNING, "", 0, BNB_KERNELS_NOTICE, (), None
        )
        assert notices.filter(kernels)
    finally:
        notices.filters[:] = before


def test_scoring_by_length_returns_the_values_in_the_order_given(tiny_assets):
    """score_completions batches the longest sequences together; each value still belongs to its
    own sequence: the same as scoring it alone, up to float32 rounding of other batch shapes."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_assets.model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    texts = ["Describe the cat.", "Describe it.", "Describe the dog in the garden today.", "Hi."]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    completions = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14, 15]]
    view = ModelView(model)
    together = score_completions(view, prompts, completions, 0, batch_size=2)
    alone = torch.cat(
        [score_completions(view, [p], [c], 0) for p, c in zip(prompts, completions, strict=True)]
    )
    assert together.tolist() == pytest.approx(alone.tolist(), rel=1e-5)
