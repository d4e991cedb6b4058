"""``python -m training.fit``'s command line: the printed config, the order in which defaults,
a ``--config`` file and flags combine, and errors that are messages with exit code 2."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from training.base.config import FitConfig
from training.fit import main


def printed_config(argv: list[str], capsys) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_prints_every_field_resolved(capsys):
    printed = printed_config(["--beta", "0.25", "--loss-type", "sigmoid", "sft"], capsys)
    expected = FitConfig()
    expected.dpo.beta = 0.25
    expected.dpo.loss_type = ["sigmoid", "sft"]
    assert printed == dataclasses.asdict(expected)


def test_defaults_then_config_file_then_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "dpo:\n  beta: 0.3\n  loss_type: [ipo]\n"
        "max_steps: 7\n"  # flat keys work too
        "learning_rate: 1e-3\n"  # YAML 1.1 reads this as a string: coerced to the field's float
        "shuffle: false\n"
    )
    printed = printed_config(["--config", str(config), "--beta", "0.5", "--shuffle"], capsys)
    expected = FitConfig()
    expected.dpo.beta = 0.5  # flag over file
    expected.data.shuffle = True  # flag over file
    expected.dpo.loss_type = ["ipo"]  # file over default
    expected.trainer.max_steps = 7
    expected.optim.learning_rate = 1e-3
    assert printed == dataclasses.asdict(expected)
    assert isinstance(printed["optim"]["learning_rate"], float)


@pytest.mark.parametrize(
    ("argv", "config_text", "expected"),
    [
        (["--loss-type", "nope"], None, ["--loss-type ['nope'] unknown", "sigmoid", "ipo"]),
        (["--loss-type", "sigmoid", "sft", "--loss-weights", "1"], None, ["--loss-weights"]),
        ([], "dpo:\n  betta: 0.2\n", ["unknown key dpo.betta"]),
        ([], "max_steps: many\n", ["config field max_steps"]),
    ],
)
def test_bad_options_are_a_message_and_exit_code_2(tmp_path, capsys, argv, config_text, expected):
    if config_text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(config_text)
        argv = [*argv, "--config", str(config)]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    for text in expected:
        assert text in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_malformed_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-steps", "many"])
    assert exit_info.value.code == 2
    assert "--max-steps: invalid int value: 'many'" in capsys.readouterr().err


def test_a_run_without_evaluation_still_says_where_its_outputs_are(tiny_assets, tmp_path, capsys):
    from tests.training.conftest import base_args, fit

    fit(base_args(tiny_assets, tmp_path, max_steps=2))  # --no-evaluate
    out = capsys.readouterr().out
    assert "done: loss" in out and " s/step; model in " in out
    assert f"metrics in {tmp_path / 'metrics.csv'}" in out
    assert "before" not in out  # no table: nothing was evaluated
