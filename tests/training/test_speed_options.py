"""The speed options reach the step: --prompt-sharing, --padding-free, --logps-keep-probs-mb,
--group-by-length, and --precompute-ref-log-probs (unset: decided from how much of the data the
run reads)."""

from __future__ import annotations

from dpo_core.reference import FrozenCopyReference
from dpo_core.step import dpo_step
from tests.dpo_core.tiny import make_batch, tiny_llama
from training.base.cli import resolve_config
from training.inputs.model_loading import build_reference
from training.inputs.precompute import pairs_read, resolve_precompute
from training.run.module import DPOModule


def test_defaults_share_prompts_and_keep_the_file_order():
    cfg, _ = resolve_config([])
    assert cfg.dpo.prompt_sharing is True and cfg.dpo.padding_free is True
    assert cfg.dpo.precompute_ref_log_probs is None
    assert cfg.data.group_by_length is False
    settings = DPOModule(tiny_llama(), None, cfg, total_steps=1).settings
    assert settings.prompt_sharing is True and settings.padding_free is True
    assert settings.keep_probs_bytes == 512 * 2**20


def test_unset_precompute_is_on_exactly_when_every_row_is_read():
    cfg, _ = resolve_config(["--batch-size", "4", "--gradient-accumulation-steps", "2"])
    assert pairs_read(cfg, total_steps=5) == 40
    assert resolve_precompute(cfg, n_train=40, total_steps=5).dpo.precompute_ref_log_probs is True
    assert resolve_precompute(cfg, n_train=41, total_steps=5).dpo.precompute_ref_log_probs is False


def test_an_explicit_precompute_choice_wins_and_reference_free_never_precomputes():
    off, _ = resolve_config(["--no-precompute-ref-log-probs"])
    assert resolve_precompute(off, n_train=1, total_steps=10).dpo.precompute_ref_log_probs is False
    on, _ = resolve_config(["--precompute-ref-log-probs"])
    assert resolve_precompute(on, n_train=10**6, total_steps=1).dpo.precompute_ref_log_probs is True
    free, _ = resolve_config(["--reference-free"])
    assert resolve_precompute(free, n_train=1, total_steps=10).dpo.precompute_ref_log_probs is False


def test_flags_reach_the_policy_step_and_the_reference():
    """The options reach the policy's log-probs and, through the same ``DPOSettings``, the
    reference's: a source holds no options of its own, ``dpo_step`` hands it
    ``reference_options()`` (recorded here by a source that spies on its calls)."""
    argv = ["--prompt-sharing", "--logps-keep-probs-mb", "0", "--group-by-length"]
    cfg, _ = resolve_config(argv)
    assert cfg.data.group_by_length is True
    settings = DPOModule(tiny_llama(), None, cfg, total_steps=1).settings
    assert settings.prompt_sharing is True and settings.keep_probs_bytes == 0
    assert settings.reference_options().prompt_sharing is True
    no_sharing, _ = resolve_config(["--no-prompt-sharing"])
    module = DPOModule(tiny_llama(), None, no_sharing, total_steps=1)
    assert module.settings.policy_options().prompt_sharing is False
    assert module.settings.reference_options().prompt_sharing is False
    padded, _ = resolve_config(["--no-padding-free"])
    settings = DPOModule(tiny_llama(), None, padded, total_steps=1).settings
    assert settings.policy_options().padding_free is False
    assert settings.reference_options().padding_free is False
    assert not vars(build_reference(tiny_llama(), padded)).keys() - {"model"}

    seen = []

    class Spy(FrozenCopyReference):
        def __call__(self, batch, options):
            seen.append(options)
            return super().__call__(batch, options)

    batch = make_batch([(3, 4), (2, 5), (3, 2), (2, 3)], length=9, vocab=128)
    dpo_step(tiny_llama(), batch, Spy(tiny_llama()), settings)
    assert seen == [settings.reference_options()]
