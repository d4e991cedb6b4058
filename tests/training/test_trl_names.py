"""trl's and transformers' option names, as flags (both spellings) and YAML keys, map onto ours;
a trl name with no counterpart is one line naming it; ``--help`` shows defaults, quickly."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.training.conftest import child_env
from training.base.cli import resolve_config
from training.fit import main


def test_trl_flags_in_both_spellings_set_our_fields():
    trl_style = [
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--num_train_epochs",
        "2", "--gradient_accumulation_steps", "3", "--save_steps", "5", "--eval_steps", "7",
        "--logging_steps", "2", "--bf16", "--use_peft", "true", "--model_name_or_path", "m",
        "--report_to", "none", "--lr_scheduler_type", "cosine", "--optim", "adamw_torch_fused",
    ]  # fmt: skip
    cfg, args = resolve_config(trl_style)
    hyphens, _ = resolve_config(
        [a.replace("_", "-") if a.startswith("--") else a for a in trl_style]
    )
    ours, _ = resolve_config(
        ["--batch-size", "4", "--learning-rate", "1e-3", "--num-train-epochs", "2",
         "--gradient-accumulation-steps", "3", "--save-every-n-steps", "5",
         "--eval-every-n-steps", "7", "--logging-steps", "2", "--precision", "bf16-mixed",
         "--lora", "--model", "m", "--report-to", "none", "--lr-scheduler-type", "cosine"]
    )  # fmt: skip
    assert cfg == hyphens == ours
    assert cfg.trainer.batch_size == 4 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.lora.lora and cfg.trainer.report_to == ["none"]
    assert {"batch_size", "precision", "lora", "model"} <= args.explicit


def test_a_trl_yaml_file_runs_unchanged(tmp_path, capsys):
    config = tmp_path / "trl.yaml"
    config.write_text(
        "model_name_or_path: ./my-model\ndataset_name: prefs.jsonl\nlearning_rate: 5.0e-7\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nbf16: false\n"
        "fp16: true\nsave_strategy: 'no'\nlogging-steps: 10\nreport_to: [tensorboard]\n"
        "loss_type: ipo\nbeta: 0.05\nuse_peft: true\nlora_r: 8\noptim: adamw_torch\n"
    )
    cfg, _ = resolve_config(["--config", str(config)])
    assert cfg.model.model == "./my-model" and cfg.data.dataset == "prefs.jsonl"
    assert cfg.trainer.batch_size == 2 and cfg.trainer.precision == "16-mixed"
    assert cfg.trainer.save_every_n_steps == 0 and cfg.trainer.logging_steps == 10
    assert cfg.dpo.loss_type == ["ipo"] and cfg.lora.lora and cfg.lora.lora_r == 8
    assert cfg.trainer.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    ("argv", "config_text", "expected"),
    [
        (["--save_total_limit", "2"], None, "--save_total_limit: save_total_limit (trl's) has no"),
        ([], "torch_compile: true\n", "torch_compile (trl's) has no counterpart here"),
        ([], "optim: sgd\n", "optim 'sgd' has no counterpart here"),
        (["--report-to", "none", "wandb"], None, "--report-to none cannot go with others"),
    ],
)
def test_a_name_with_no_counterpart_is_one_line(tmp_path, capsys, argv, config_text, expected):
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


HELP_PROBE = """
import runpy, sys
sys.argv = ["training.fit", "--help"]
try:
    runpy.run_module("training.fit", run_name="__main__")
except SystemExit:
    pass
print("heavy:", sorted(m for m in ("lightning", "transformers", "peft") if m in sys.modules))
"""


def test_help_shows_defaults_and_trl_names_before_the_heavy_imports():
    """--help answers before Lightning, transformers and peft load (they took 12 s on a busy
    machine), in under 3 s of CPU time (wall time varies with the machine's other load)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-c", HELP_PROBE],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stderr
    assert "(default: 8)" in done.stdout and "--per_device_train_batch_size" in done.stdout
    assert "--bf16" in done.stdout and "--report-to" in done.stdout
    assert "heavy: []" in done.stdout
    assert cpu < 3, f"--help took {cpu:.1f} s of CPU"
