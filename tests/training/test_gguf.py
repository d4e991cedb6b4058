"""``--model`` as a GGUF checkpoint (``training.inputs.gguf``), on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import HH_RLHF_FILE
from tests.training.conftest import TinyAssets, base_args, fit
from training.inputs.gguf import GGUFError, as_model_dir, find_gguf, is_model_dir


def test_find_gguf_takes_a_file_or_a_directory_with_exactly_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(tmp_path / "a.gguf") == (tmp_path, "a.gguf")
    assert find_gguf(tmp_path) == (tmp_path, "a.gguf")
    (tmp_path / "notes.txt").write_text("x")
    assert find_gguf(tmp_path / "notes.txt") is None
    (tmp_path / "b.GGUF").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"holds 2 \.gguf files \(a\.gguf, b\.GGUF\)"):
        find_gguf(tmp_path)


def test_other_model_paths_pass_through(tmp_path, tiny_assets):
    assert (
        as_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert as_model_dir(str(tiny_assets.model_dir)) == str(tiny_assets.model_dir)
    (tmp_path / "empty").mkdir()
    assert as_model_dir(str(tmp_path / "empty")) == str(tmp_path / "empty")


def test_a_broken_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(GGUFError, match="broken.gguf"):
        as_model_dir(str(bad), cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_smollm2_converts_to_a_model_directory_equal_to_its_gguf(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_model_dir(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # or from_pretrained would look for a .gguf again
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in chat

    gguf = smollm2.parent / "gguf"
    converted = as_model_dir(str(gguf), cache_dir=tmp_path)  # a directory holding the .gguf
    assert converted != str(gguf) and as_model_dir(str(gguf), cache_dir=tmp_path) == converted
    directory, name = find_gguf(gguf)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(converted)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)(ids).logits
    assert torch.equal(plain, original)  # the same float32 weights, the same computation


@pytest.mark.slow
def test_fit_takes_a_gguf_file_as_model(smollm2, tmp_path):
    gguf = next((smollm2.parent / "gguf").glob("*.gguf"))
    real = TinyAssets(model_dir=gguf, data_file=HH_RLHF_FILE)
    flags = {"lora": True, "max_rows": 8, "max_steps": 1, "batch_size": 2, "max_length": 128}
    result = fit(base_args(real, tmp_path, **flags))
    assert len(result.history) == 1 and result.history[0]["loss"] > 0
    adapter = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert is_model_dir(adapter["base_model_name_or_path"])  # the converted directory
