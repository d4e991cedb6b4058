"""Bad flags, YAML fields, config files and evaluation directories end in one ``error:`` line
naming the flag or file, never a traceback, never a run that does something else: a usage error
(a flag, a field, a ``--config`` file) exits with code 2, as argparse's own refusals do; a
failure of the run (no GPU, a model directory, the data) with code 1. Nothing is trained or
written. (The model, data and disk cases of a run: ``test_bad_input_run.py``,
``test_bad_input_data.py``; the learning-rate schedules: ``test_schedules.py``.)
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest

import training.evaluate
import training.fit
from dpo_core.errors import COMPLETION_ROLE
from dpo_core.rows import DataError, validate_row
from tests.training.conftest import base_args, preference_rows
from training import sweep
from training.base.cli import config_to_yaml
from training.base.config import FitConfig
from training.fit import main
from training.run import outputs


def refused(argv: list[str], capsys, code: int = 2) -> str:
    """Run ``training.fit.main(argv)``; assert exit ``code`` and one error line, no traceback."""
    try:
        assert main(argv) == code
    except SystemExit as exit_info:  # argparse's own refusal
        assert exit_info.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error: " in x]
    return line


def no_loading(monkeypatch):
    """Make any loading of model or data fail the test: the check must come first."""

    def loaded(*_args, **_kwargs):
        raise AssertionError("loading started before the check")

    monkeypatch.setattr(training.fit, "prepare_inputs", loaded)
    monkeypatch.setattr(training.evaluate, "prepare_inputs", loaded)


# --- flags: names, types and ranges ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"lr_scheduler_type": "cosinee"}, "--lr-scheduler-type must be one of linear, cosine,"),
        ({"lr_scheduler_type": "constant", "warmup_steps": 2}, "constant has no warm-up"),
        ({"max_steps": 0}, "--max-steps must be -1 or >= 1, got 0"),
        ({"devices": 0}, "--devices must be -1 or >= 1, got 0"),
        ({"eval_fraction": -0.5}, "--eval-fraction must be in [0, 1), got -0.5"),
        ({"eval_fraction": 1.5}, "--eval-fraction must be in [0, 1), got 1.5"),
        ({"max_rows": -1}, "--max-rows must be >= 1 (or none), got -1"),
        ({"warmup_steps": -3}, "--warmup-steps must be >= 0, got -3"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio must be in [0, 1], got 1.5"),
        ({"save_every_n_steps": -1}, "--save-every-n-steps must be >= 0, got -1"),
        ({"learning_rate": 0}, "--learning-rate must be > 0, got 0.0"),
        ({"weight_decay": -0.1}, "--weight-decay must be >= 0, got -0.1"),
        ({"adam_beta1": 1.0}, "--adam-beta1 must be in [0, 1), got 1.0"),
        ({"adam_beta2": -0.1}, "--adam-beta2 must be in [0, 1), got -0.1"),
        ({"adam_epsilon": 0}, "--adam-epsilon must be > 0, got 0.0"),
        ({"max_grad_norm": -1}, "--max-grad-norm must be >= 0, got -1.0"),
        ({"lora_r": 0}, "--lora-r must be >= 1, got 0"),
        ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"eval_batch_size": 0}, "--eval-batch-size must be >= 1, got 0"),
        ({"eval_max_pairs": 0}, "--eval-max-pairs must be >= 1 (or none), got 0"),
        ({"num_workers": -1}, "--num-workers must be >= 0, got -1"),
        ({"eval_every_n_steps": 0}, "--eval-every-n-steps must be >= 1 (or none), got 0"),
        ({"num_train_epochs": 0}, "--num-train-epochs must be > 0, got 0.0"),
        ({"dtype": "float8"}, "--dtype must be one of float32, bfloat16, float16, got 'float8'"),
        ({"accelerator": "tpu"}, "--accelerator must be one of auto, cpu, gpu, cuda, mps"),
        ({"strategy": "dp"}, "--strategy must be one of auto, ddp,"),
        ({"precision": "17"}, "--precision must be one of 32-true,"),
        ({"truncation_mode": "middle"}, "--truncation-mode must be one of keep_start, keep_end"),
        ({"bnb_4bit_quant_type": "int4"}, "--bnb-4bit-quant-type must be one of nf4, fp4"),
        ({"temperature": 0}, "--temperature must be > 0, got 0.0"),
        ({"top_p": 1.5}, "--top-p must be in (0, 1], got 1.5"),
    ],
)
def test_a_flag_out_of_range_is_one_line_naming_it(
    tiny_assets, tmp_path, capsys, monkeypatch, flags, message
):
    no_loading(monkeypatch)
    out = tmp_path / "out"
    line = refused(base_args(tiny_assets, out, **flags), capsys)
    assert line.startswith("error: ") and message in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "1e-4"], "unrecognized arguments: --lr 1e-4"),  # not --lr-scheduler-type
        (["--max-steps", "2.5"], "--max-steps: invalid int value: '2.5'"),  # not truncated
        (["--lora-r", "true"], "--lora-r: invalid int value: 'true'"),
    ],
)
def test_argparse_refuses_abbreviations_and_wrong_types(
    tiny_assets, tmp_path, capsys, argv, message
):
    out = tmp_path / "out"
    line = refused([*base_args(tiny_assets, out), *argv], capsys)
    assert message in line
    assert not out.exists()


def test_evaluate_and_sweep_take_no_abbreviations(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.evaluate.main(["--model-d", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --model-d" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # passed on to training.fit, which refuses it
        sweep.main(["--beta", "0.1", "--output-dir", str(tmp_path / "sweep"), "--lr", "1e-4"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --lr" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_gpu_asked_for_but_none_visible(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "out"
    line = refused(base_args(tiny_assets, out, accelerator="gpu"), capsys, code=1)
    assert line == (
        "error: --accelerator gpu: no GPU is visible (torch.cuda.is_available() is False); "
        "use --accelerator cpu or auto"
    )
    assert not out.exists()


# --- --config files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_steps: 2.5\n", "config field max_steps: expected an integer, got 2.5"),
        ("max_steps: true\n", "config field max_steps: expected an integer, got True"),
        ("trainer:\n  batch_size: 4.0\n", "config field batch_size: expected an integer, got 4.0"),
        ("lora: 1\n", "config field lora: expected true/false, got 1"),
        ("learning_rate: [1, 2]\n", "config field learning_rate: expected a number, got [1, 2]"),
        ("warmup_steps: -3\n", "--warmup-steps must be >= 0, got -3"),
        ("lr_scheduler_type: cosinee\n", "--lr-scheduler-type must be one of linear,"),
        ("- max_steps: 3\n", "expected a mapping of fields (field: value), got a YAML list"),
        ("just text\n", "expected a mapping of fields (field: value), got a YAML str"),
        ("beta: 0.1\nmax_steps: [3\n", ", line 3: not valid YAML ("),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(
    tiny_assets, tmp_path, capsys, monkeypatch, text, message
):
    no_loading(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    line = refused([*base_args(tiny_assets, out), "--config", str(config)], capsys)
    assert message in line
    if not message.startswith("--"):  # a range: the flag is named, the file was read
        assert str(config) in line
    assert not out.exists()


def test_a_missing_config_file_is_named(tiny_assets, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = refused([*base_args(tiny_assets, tmp_path / "out"), "--config", str(missing)], capsys)
    assert line == f"error: --config {missing}: no such file"


# --- training.evaluate -------------------------------------------------------------------------


def run_dir(tiny_assets, tmp_path, config: str | None = "valid"):
    """A run directory: a copy of the tiny model as ``model/``, and a ``config.yaml``."""
    run = tmp_path / "run"
    shutil.copytree(tiny_assets.model_dir, run / "model")
    if config == "valid":
        cfg = FitConfig()
        cfg.model.model, cfg.data.dataset = str(tiny_assets.model_dir), str(tiny_assets.data_file)
        config = config_to_yaml(cfg)
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


def evaluate_fails(argv: list[str], capsys) -> str:
    assert training.evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def test_evaluate_a_model_dir_without_weights(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    run = run_dir(tiny_assets, tmp_path)
    (run / "model" / "model.safetensors").unlink()
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert f"--model-dir {run / 'model'}: no weights" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model"]


def test_evaluate_with_a_corrupt_config_yaml(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    run = run_dir(tiny_assets, tmp_path, config="model: [unclosed\n")
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert f"{run / 'config.yaml'}, line 2: not valid YAML" in line
    (run / "config.yaml").write_text("trainer:\n  max_steps: 0\n")
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert line == f"error: {run / 'config.yaml'}: --max-steps must be -1 or >= 1, got 0"
    (run / "config.yaml").write_text("max_length: 2.5\n")
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert "config field max_length: expected an integer, got 2.5" in line


def test_evaluate_without_config_yaml_refuses_the_embedded_default(
    tiny_assets, tmp_path, capsys, monkeypatch
):
    no_loading(monkeypatch)
    run = run_dir(tiny_assets, tmp_path, config=None)
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert line.startswith(f"error: {run / 'config.yaml'}: no such file")
    assert "give --reference and --dataset or --eval-file" in line
    assert sorted(p.name for p in run.iterdir()) == ["model"]


def test_evaluate_into_a_read_only_output_dir(tiny_assets, tmp_path, capsys, monkeypatch):
    # Simulated (tests may run as root): the file system refuses the probe file.
    no_loading(monkeypatch)
    run = run_dir(tiny_assets, tmp_path)

    def read_only(*_args, dir=None, **_kwargs):  # noqa: A002 - tempfile's name
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    line = evaluate_fails(["--model-dir", str(run / "model")], capsys)
    assert f"--output-dir {run}: not writable (permission denied)" in line


# --- data the model cannot take ----------------------------------------------------------------


def chat_rows(path, completion_role: str = "assistant"):
    """Conversational rows in a jsonl file; row 3's chosen completion has ``completion_role``."""
    lines = []
    for i, r in enumerate(preference_rows(8)):
        role = completion_role if i == 2 else "assistant"
        row = {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": role, "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path


def test_conversational_rows_for_a_tokenizer_without_chat_template(tiny_assets, tmp_path, capsys):
    model = shutil.copytree(tiny_assets.model_dir, tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = chat_rows(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    line = refused(base_args(tiny_assets, out, model=model, dataset=data), capsys, code=1)
    assert line == (
        f"error: --model {model}: its tokenizer has no chat template, but {data} holds "
        "conversational rows (lists of role/content messages); use a model with a chat "
        "template (an instruct model) or rows of text"
    )
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


def test_a_user_turn_in_a_completion_is_a_data_error(tiny_assets, tmp_path, capsys):
    data = chat_rows(tmp_path / "chat.jsonl", completion_role="user")
    out = tmp_path / "out"
    line = refused(base_args(tiny_assets, out, dataset=data), capsys, code=1)
    assert line == (
        f"error: {data}, line 3, field 'chosen': message 0 has role 'user'; a completion is the "
        "model's reply: it starts and ends with an 'assistant' message"
    )
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    implicit = {  # an implicit prompt: the completion starts after the shared first message
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "a"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(DataError) as err:
        validate_row(implicit, source="s", index=0)
    assert (err.value.field, err.value.reason) == ("chosen", COMPLETION_ROLE)
    assert "message 1 has role 'system'" in str(err.value)
    # a multi-turn completion, as trl trains it, starts and ends with the model: accepted
    ask, yes, no = (
        {"role": r, "content": c}
        for r, c in [("user", "?"), ("assistant", "y"), ("assistant", "n")]
    )
    validate_row(
        {"prompt": [ask], "chosen": [yes, ask, yes], "rejected": [no]}, source="s", index=0
    )
