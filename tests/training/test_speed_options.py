"""The speed options reach the step: --prompt-sharing, --logps-keep-probs-mb, --group-by-length."""

from __future__ import annotations

from tests.dpo_core.test_logps import tiny_llama
from training.cli import resolve_config
from training.models import build_reference
from training.module import DPOModule


def test_defaults_keep_the_plain_forward_and_the_file_order():
    cfg, _ = resolve_config([])
    assert cfg.dpo.prompt_sharing is False
    assert cfg.data.group_by_length is False
    settings = DPOModule(tiny_llama(), None, cfg, total_steps=1).settings
    assert settings.prompt_sharing is False
    assert settings.keep_probs_bytes == 512 * 2**20


def test_flags_reach_the_policy_step_and_the_reference():
    argv = ["--prompt-sharing", "--logps-keep-probs-mb", "0", "--group-by-length"]
    cfg, _ = resolve_config(argv)
    assert cfg.data.group_by_length is True
    settings = DPOModule(tiny_llama(), None, cfg, total_steps=1).settings
    assert settings.prompt_sharing is True and settings.keep_probs_bytes == 0
    assert build_reference(tiny_llama(), cfg).prompt_sharing is True
    no_sharing, _ = resolve_config(["--no-prompt-sharing"])
    assert build_reference(tiny_llama(), no_sharing).prompt_sharing is False
