"""The embedded default's assets (``training.embedded.assets``) and the warm-up that makes its model
(``training.embedded.warmup``), on a tiny recipe that builds in a few seconds."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_core.rows import read_jsonl
from training.embedded import assets as embedded
from training.embedded.assets import (
    VERSION,
    EmbeddedRecipe,
    TinyLlamaConfig,
    build_model,
    default_cache_dir,
    prepare_embedded,
    recipe_key,
)
from training.embedded.synthetic import SyntheticConfig, judge
from training.embedded.tokenizer import train_tokenizer
from training.embedded.warmup import (
    WarmupConfig,
    both_responses,
    causal_lm_loss,
    lr_at,
    warmup_causal_lm,
)

TINY = EmbeddedRecipe(
    task=SyntheticConfig(n_train=40, n_eval=8),
    model=TinyLlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
    ),
    warmup=WarmupConfig(steps=4, batch_size=8, ramp_steps=1, log_every=2),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny assets, built once for the module, and the log lines of that build."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("embedded")
    lines: list[str] = []
    assets = prepare_embedded(cache, seed=0, recipe=TINY, log=lines.append)
    return cache, assets, lines


def test_build_writes_every_asset(built):
    cache, assets, lines = built
    root = cache / recipe_key(TINY, 0)
    assert assets.model_dir == assets.tokenizer_dir == root / "model"
    assert (assets.model_dir / "config.json").is_file()
    assert (assets.model_dir / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temporary directory left
    train, held_out = read_jsonl(assets.train_file), read_jsonl(assets.eval_file)
    assert (len(train), len(held_out)) == (TINY.task.n_train, TINY.task.n_eval)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in train + held_out)
    assert assets.judge is judge
    saved = json.loads((root / "recipe.json").read_text())
    assert saved == {"recipe": json.loads(json.dumps(asdict(TINY))), "seed": 0}
    assert any(line.startswith("warm-up step 4/4") for line in lines)


def test_second_call_reuses_without_rebuilding(built, monkeypatch):
    cache, assets, _ = built

    def no_build(*args, **kwargs):
        raise AssertionError("the cached assets should have been reused")

    monkeypatch.setattr(embedded, "build_assets", no_build)
    lines: list[str] = []
    again = prepare_embedded(cache, seed=0, recipe=TINY, log=lines.append)
    assert again == assets
    assert lines == [f"embedded: reusing {cache / recipe_key(TINY, 0)}"]


def test_model_loads_and_generates(built):
    _, assets, _ = built
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    assert model.config.num_hidden_layers == TINY.model.num_layers
    assert model.config.vocab_size == len(tok)
    special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == special
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (True, 1.0, 0, 1.0)
    row = read_jsonl(assets.eval_file)[0]
    ids = tok(row["prompt"], return_tensors="pt")
    assert ids["input_ids"][0, 0] == tok.bos_token_id
    draws = []
    for _ in range(2):  # the saved config samples; a seed makes the draw reproducible
        torch.manual_seed(0)
        draws.append(model.generate(**ids, max_new_tokens=5, min_new_tokens=5))
    assert draws[0].shape == (1, ids["input_ids"].shape[1] + 5)
    assert torch.equal(draws[0][:, : ids["input_ids"].shape[1]], ids["input_ids"])
    assert torch.equal(draws[0], draws[1])


def test_key_follows_recipe_and_seed():
    key = recipe_key(TINY, 0)
    assert key.startswith(f"{VERSION}-") and key == recipe_key(EmbeddedRecipe(**vars(TINY)), 0)
    assert recipe_key(TINY, 1) != key
    longer = EmbeddedRecipe(TINY.task, TINY.model, WarmupConfig(steps=5, batch_size=8))
    assert recipe_key(longer, 0) != key


def test_default_cache_dir_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DPO_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "dpo", "embedded")


def test_concurrent_build_keeps_the_first_finished(monkeypatch, tmp_path):
    """Another process renames its build into place while ours runs: ours is discarded."""
    root = tmp_path / recipe_key(TINY, 7)

    def other_process_wins(out_dir, recipe, seed, log):
        (out_dir / "mine").write_text("")
        root.mkdir()
        (root / "theirs").write_text("")

    monkeypatch.setattr(embedded, "build_assets", other_process_wins)
    lines: list[str] = []
    assets = prepare_embedded(tmp_path, seed=7, recipe=TINY, log=lines.append)
    assert assets.model_dir == root / "model"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
    assert [p.name for p in root.iterdir()] == ["theirs"]
    assert any("another process built" in line for line in lines)


def test_failed_build_leaves_no_trace(monkeypatch, tmp_path):
    def crash(out_dir, recipe, seed, log):
        (out_dir / "half").write_text("")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(embedded, "build_assets", crash)
    with pytest.raises(RuntimeError, match="out of disk"):
        prepare_embedded(tmp_path, seed=0, recipe=TINY, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_model_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible"):
        TinyLlamaConfig(hidden_size=30, num_heads=4)


# --- training.embedded.warmup ---------------------------------------------------------------------------


def test_lr_schedule_by_hand():
    """steps=10, ramp_steps=2, lr=1, f=0.1: ramp 1/2, 2/2; then p = (step-2)/7 and
    lr = 0.1 + 0.9 (1 + cos(pi p)) / 2, so 1.0 at step 2 and 0.1 at step 9; at step 5.5 (p=1/2)
    it would be 0.55, and steps 5 and 6 straddle it symmetrically."""
    config = WarmupConfig(steps=10, lr=1.0, ramp_steps=2, final_lr_fraction=0.1)
    assert [lr_at(s, config) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.1])
    assert (lr_at(5, config) + lr_at(6, config)) / 2 == pytest.approx(0.55)


def test_both_responses_are_the_strings_trl_tokenises():
    rows = [{"prompt": "P:", "chosen": " good.", "rejected": " bad."}]
    assert both_responses(rows, "</s>") == ["P: good.</s>", "P: bad.</s>"]


def _tiny_model_and_tokenizer(texts):
    tok = train_tokenizer(texts, vocab_size=300)
    config = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    return build_model(config, tok, seed=0), tok


def test_causal_lm_loss_equals_transformers_loss():
    """Our shift-and-mask equals the model's own ``labels`` loss (pads labelled -100)."""
    texts = ["A short one.</s>", "A somewhat longer text to pad against.</s>"]
    model, tok = _tiny_model_and_tokenizer(texts)
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    theirs = model(**enc, labels=labels).loss
    ours = causal_lm_loss(model, enc["input_ids"], enc["attention_mask"])
    # Same float32 mean over the same ~15 terms, summed in a different order: a few ulps.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_warmup_lowers_the_loss_and_is_seeded():
    texts = [f"Review {i}: it was lovely.</s>" for i in range(8)]
    config = WarmupConfig(steps=30, batch_size=4, lr=1e-2, ramp_steps=0, log_every=10)
    runs = []
    for _ in range(2):
        model, tok = _tiny_model_and_tokenizer(texts)
        lines: list[str] = []
        runs.append(warmup_causal_lm(model, tok, texts, config, seed=0, log=lines.append))
    assert runs[0] == runs[1]  # same seed, same thread count: bitwise the same losses
    assert sum(runs[0][-5:]) / 5 < 0.5 * sum(runs[0][:5]) / 5
    assert len(lines) == 3 and lines[-1].startswith("warm-up step 30/30")
    assert not model.training


def test_warmup_rejects_empty_texts():
    model, tok = _tiny_model_and_tokenizer(["x"])
    with pytest.raises(ValueError, match="texts is empty"):
        warmup_causal_lm(model, tok, [], log=lambda _: None)
