"""``python -m training.sweep``: one run per beta, and their points on one frontier plot."""

from __future__ import annotations

import json

import pytest

from tests.training.conftest import base_args
from tests.training.test_plots import assert_png
from training.sweep import main, run_dir


def test_sweep_trains_each_beta_and_plots_the_frontier(tiny_assets, tmp_path, capsys):
    fit_argv = base_args(
        tiny_assets,
        tmp_path / "ignored",  # the sweep gives each beta its own output directory
        max_steps=1,
        eval_fraction=0.25,
        num_prompts=2,
        max_new_tokens=4,
        judge="tests.training.test_evaluate:kind_judge",
    )
    root = tmp_path / "sweep"
    assert main(["--beta", "0.1", "2", "--output-dir", str(root), "--", *fit_argv]) == 0
    runs = json.loads((root / "sweep.json").read_text())
    assert [r["beta"] for r in runs] == [0.1, 2.0]
    for r in runs:
        saved = json.loads((run_dir(root, r["beta"]) / "eval.json").read_text())
        assert saved == {k: v for k, v in r.items() if k != "beta"}
    # One optimizer step from the same start on the same rows: Adam's first update is
    # sign-like, blind to the gradient's scale (which beta sets), so both runs hold the same
    # log-ratios and the reward margins differ by the ratio of the betas, 20 (measured
    # 20.00005; a beta that did not reach the loss, or the wrong run's numbers, break it).
    small, large = (r["after"]["reward_margin"] for r in runs)
    assert large / small == pytest.approx(20, rel=1e-3)
    assert_png(root / "frontier.png")
    assert "frontier:" in capsys.readouterr().out


def test_sweep_rejects_a_non_positive_beta(tmp_path, capsys):
    assert main(["--beta", "0", "--output-dir", str(tmp_path)]) == 2
    assert "beta" in capsys.readouterr().err
