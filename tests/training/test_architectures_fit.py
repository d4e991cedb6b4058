"""``training.fit`` on every decoder family of the zoo (parity/sides/zoo.py): the run loads the
model, the own-logits guard passes on policy and reference, and training takes the fast path
(prompt sharing and padding-free; RecurrentGemma runs plain, its recurrent blocks carry state
across packed segments) and moves the weights."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import AutoTokenizer

import dpo_core.logps
from dpo_core.packing import packed_states
from parity.sides.zoo import ZOO, tiny_zoo_model
from tests.training.conftest import base_args, fit

PLAIN_ONLY = {"recurrent_gemma"}


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets.model_dir)


def zoo_model_dir(model_type: str, tokenizer, root):
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    model = tiny_zoo_model(model_type, ids=ids)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, model


def count_packed_forwards(monkeypatch) -> list[bool]:
    """Record, for each log-prob forward of the run, whether it ran on packed rows."""
    packed: list[bool] = []

    def counted(*args, **kwargs):
        states = packed_states(*args, **kwargs)
        packed.append(states is not None)
        return states

    monkeypatch.setattr(dpo_core.logps, "packed_states", counted)
    return packed


@pytest.mark.parametrize("model_type", list(ZOO))
def test_fit_trains_on_the_fast_path(
    model_type, tiny_assets, tokenizer, tmp_path, caplog, monkeypatch
):
    packed = count_packed_forwards(monkeypatch)
    model_dir, initial = zoo_model_dir(model_type, tokenizer, tmp_path / "model")
    argv = base_args(tiny_assets, tmp_path / "out", model=model_dir, max_steps=2, batch_size=4)
    with (
        warnings.catch_warnings(record=True) as seen,
        caplog.at_level(logging.INFO, "training.fit"),
    ):
        warnings.simplefilter("always")
        result = fit(argv)
    fallbacks = [str(w.message) for w in seen if "prompt sharing off" in str(w.message)]
    assert bool(fallbacks) == (model_type in PLAIN_ONLY), fallbacks
    assert len(packed) == 4  # 2 steps x (policy, reference)
    assert all(packed) if model_type not in PLAIN_ONLY else not any(packed)
    checks = [r.message for r in caplog.records if r.message.startswith("own-logits check")]
    assert [c.split(",")[0] for c in checks] == [
        "own-logits check (policy",
        "own-logits check (reference",
    ]
    assert all("log-probs equal" in c for c in checks), checks
    trained = dict(result.policy.named_parameters())
    moved = [n for n, p in initial.named_parameters() if not torch.equal(p, trained[n].detach())]
    assert moved, "no weight moved"


def test_a_model_whose_logits_we_cannot_reproduce_is_refused_at_load(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    """A model class that soft-caps its logits in code, under no config name: the run stops
    before any step with one line naming the model type and the difference; nothing is written
    but the config."""
    from transformers import LlamaForCausalLM

    from training.fit import main

    own_forward = LlamaForCausalLM.forward

    def capped(self, *args, **kwargs):
        out = own_forward(self, *args, **kwargs)
        out.logits = 0.5 * torch.tanh(out.logits / 0.5)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", capped)
    out = tmp_path / "out"
    assert main(base_args(tiny_assets, out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: policy model refused: llama: the model's own logits are not")
    assert "off by" in line
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
