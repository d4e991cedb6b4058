"""Tiny parity models: every architecture builds from its seed, and the reference differs."""

from __future__ import annotations

import pytest
import torch

from parity.sides.cases import ARCHS, ParityCase
from parity.sides.models import build_tiny_model, load_model, perturbed_copy
from parity.sides.workspace import prepare_workspace


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_seeded_and_matches_the_tokenizer(arch, tiny_tokenizer):
    model = build_tiny_model(arch, tiny_tokenizer, seed=3)
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    again = build_tiny_model(arch, tiny_tokenizer, seed=3)
    other = build_tiny_model(arch, tiny_tokenizer, seed=4)
    first = next(model.parameters())
    assert torch.equal(first, next(again.parameters()))
    assert not torch.equal(first, next(other.parameters()))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_perturbed_reference_differs_and_keeps_ties(arch, tiny_tokenizer):
    policy = build_tiny_model(arch, tiny_tokenizer, seed=0)
    reference = perturbed_copy(policy, seed=1)
    assert reference.lm_head.weight is reference.get_input_embeddings().weight
    ids = torch.tensor([tiny_tokenizer("hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        diff = (policy(ids).logits - reference(ids).logits).abs().max().item()
    # 10% relative noise on every weight moves the logits far beyond float32 rounding.
    assert diff > 1e-3
    again = perturbed_copy(policy, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), again.parameters()))


def test_workspace_is_written_once_and_reused(tmp_path):
    case = ParityCase(name="ws", steps=1, batch_size=2, vocab_size=300, arch="mistral")
    ws = prepare_workspace(case, tmp_path)
    assert ws.data_path.is_file() and (ws.policy_dir / "config.json").is_file()
    stamp = (ws.reference_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_workspace(case, tmp_path) == ws
    assert (ws.reference_dir / "model.safetensors").stat().st_mtime_ns == stamp
    policy, reference = load_model(ws.policy_dir, case), load_model(ws.reference_dir, case)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))
    assert len(ws.tokenizer()) == policy.config.vocab_size
