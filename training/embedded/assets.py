"""The embedded default: everything ``python -m training.fit`` trains on when given nothing.

With no network, ``prepare_embedded`` makes (or finds on disk) four things:

1. the synthetic controlled-sentiment task of ``training.embedded.synthetic``, as ``train.jsonl`` and
   ``eval.jsonl`` (explicit ``prompt`` / ``chosen`` / ``rejected`` rows);
2. a byte-level BPE tokenizer trained offline on the train texts (``training.embedded.tokenizer``);
3. a small Llama-style causal LM built from a config, then warmed up on **both** completions of
   every train pair (``training.embedded.warmup``), so it starts DPO writing positive and negative
   continuations alike (the DPO paper, §4, fits the preferred completions when no SFT model
   exists; fitting both keeps the starting model neutral, as its sentiment task's base was);
4. the judge, the task's exact rule (``training.embedded.synthetic.judge``).

The default recipe (2 layers, width 128, 0.77 M parameters; 1,000 warm-up steps of 32 texts)
builds in about 40 s on 2 CPU threads. Measured with a plain DPO loop on it (sigmoid loss,
beta 0.1, AdamW lr 1e-4 decaying linearly to 0, 16 pairs a step, 100 steps, reference = the
warmed-up model) over the 200 held-out rows, seeds 0-2: samples' judge score 0.47-0.57 before,
0.93-1.0 after; held-out reward accuracy 1.0 after; exactly well-formed samples
(``synthetic.is_well_formed``) about 0.97 before and 0.9-0.95 after. Longer or hotter DPO runs
raise the score further while fluency falls (likelihood displacement).

Layout on disk (the model directory holds the tokenizer too)::

    <cache_dir>/<version>-<hash>/
        recipe.json          the recipe and seed that made it
        data/train.jsonl
        data/eval.jsonl
        model/               save_pretrained: config, weights, generation config, tokenizer

The hash covers the recipe, the seed and the source of the modules that build the assets, so a
changed recipe or task rebuilds while an unchanged one is reused. A build happens in a temporary
directory beside the final one and is renamed into place, so concurrent runs never see half an
asset: the first rename wins and the others reuse it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpo_core.rows import write_jsonl
from training.embedded import synthetic, tokenizer, warmup
from training.embedded.synthetic import SyntheticConfig, judge, make_splits
from training.embedded.tokenizer import train_tokenizer
from training.embedded.warmup import WarmupConfig, both_responses, warmup_causal_lm

VERSION = "v1"  # bump when the layout on disk changes


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Shape of the embedded model (a ``LlamaForCausalLM``).

    Attributes:
        vocab_size: BPE vocabulary size the tokenizer is trained to (special tokens included).
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_layers: decoder layers.
        num_heads: attention heads (as many key/value heads: plain multi-head attention).
        max_positions: ``max_position_embeddings``; prompt + completion + generation must fit.
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 128

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TinyLlamaConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class EmbeddedRecipe:
    """Everything that decides the embedded assets (besides the seed)."""

    task: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


@dataclass(frozen=True)
class EmbeddedAssets:
    """Paths to the embedded default's files, and its judge.

    Attributes:
        model_dir: the warmed-up model (``AutoModelForCausalLM.from_pretrained``).
        tokenizer_dir: its tokenizer (``AutoTokenizer.from_pretrained``); the same directory.
        train_file: train rows, jsonl, explicit ``prompt`` / ``chosen`` / ``rejected``.
        eval_file: held-out rows, same shape, prompts disjoint from train's.
        judge: ``judge(prompt, completion) -> float`` in [0, 1], 1 for a positive completion.
    """

    model_dir: Path
    tokenizer_dir: Path
    train_file: Path
    eval_file: Path
    judge: Callable[[str, str], float]


def default_cache_dir() -> Path:
    """``$DPO_CACHE`` if set, else ``~/.cache/dpo/embedded``."""
    env = os.environ.get("DPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpo" / "embedded"


def recipe_key(recipe: EmbeddedRecipe, seed: int) -> str:
    """``"<VERSION>-<12 hex>"``: a SHA-256 over the recipe, the seed and the builders' source."""
    digest = hashlib.sha256(json.dumps([asdict(recipe), seed], sort_keys=True).encode())
    for module in (synthetic, tokenizer, warmup):
        digest.update(inspect.getsource(module).encode())
    digest.update(inspect.getsource(build_model).encode())
    return f"{VERSION}-{digest.hexdigest()[:12]}"


def build_model(
    config: TinyLlamaConfig, tok: PreTrainedTokenizerFast, seed: int
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (seeded), its special ids taken from ``tok``,
    whose generation config samples by default (temperature 1, no top-k / top-p cut).
    """
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the initialisation, not the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(llama, key))
    # Plain ancestral sampling, as the DPO paper samples for its sentiment task; a completion of
    # the task is at most ~25 tokens, so 40 new tokens always leave room for the EOS.
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    model.generation_config.max_new_tokens = 40
    return model


def build_assets(
    out_dir: Path, recipe: EmbeddedRecipe, seed: int, log: Callable[[str], None]
) -> None:
    """Write data, tokenizer and warmed-up model under ``out_dir`` (which must exist)."""
    splits = make_splits(recipe.task, seed=seed)
    (out_dir / "data").mkdir()
    write_jsonl(splits.train, out_dir / "data" / "train.jsonl")
    write_jsonl(splits.eval, out_dir / "data" / "eval.jsonl")
    log(f"embedded: task written ({len(splits.train)} train / {len(splits.eval)} eval rows)")

    corpus = [r["prompt"] + r[k] for r in splits.train for k in ("chosen", "rejected")]
    tok = train_tokenizer(corpus, vocab_size=recipe.model.vocab_size)
    model = build_model(recipe.model, tok, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"embedded: tokenizer {len(tok)} tokens, model {n_params / 1e6:.2f} M parameters")

    texts = both_responses(splits.train, tok.eos_token)
    warmup_causal_lm(model, tok, texts, recipe.warmup, seed=seed, log=log)
    model.save_pretrained(out_dir / "model")
    tok.save_pretrained(out_dir / "model")
    recipe_json = json.dumps({"recipe": asdict(recipe), "seed": seed}, indent=2)
    (out_dir / "recipe.json").write_text(recipe_json + "\n")


# What a finished build holds (``build_assets`` writes them before the folder is renamed into
# place): a cache entry without one of them, or with one empty, was damaged since.
ASSET_FILES = (
    "recipe.json",
    "data/train.jsonl",
    "data/eval.jsonl",
    "model/config.json",
    "model/tokenizer.json",
    "model/model.safetensors",
)


def damage(root: Path) -> str:
    """Why the cached assets at ``root`` cannot be used, or "" when they are whole: a file
    missing or empty, a recipe.json that is not JSON, weights shorter than their header says."""
    for name in ASSET_FILES:
        path = root / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path} is missing or empty"
    try:
        json.loads((root / "recipe.json").read_text())
    except (OSError, ValueError):
        return f"{root / 'recipe.json'} is not valid JSON"
    return _short_safetensors(root / "model" / "model.safetensors")


def _short_safetensors(path: Path) -> str:
    """ "" if the safetensors file at ``path`` is as long as its header says, else why not."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length)) if 0 < length < 1 << 27 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    size = path.stat().st_size
    return f"{path} is truncated ({size} of {expected} bytes)" if size < expected else ""


def _discard(root: Path, cache_dir: Path) -> None:
    """Remove a damaged cache entry: renamed aside first (atomic), so that no process reuses it
    half-deleted; another process may have done so already."""
    aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.damaged-", dir=cache_dir))
    try:
        root.rename(aside / root.name)
    except OSError:
        pass  # gone already: another process discarded it
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _assets(root: Path) -> EmbeddedAssets:
    return EmbeddedAssets(
        model_dir=root / "model",
        tokenizer_dir=root / "model",
        train_file=root / "data" / "train.jsonl",
        eval_file=root / "data" / "eval.jsonl",
        judge=judge,
    )


def prepare_embedded(
    cache_dir: Path | None = None,
    *,
    seed: int = 0,
    recipe: EmbeddedRecipe | None = None,
    log: Callable[[str], None] = print,
) -> EmbeddedAssets:
    """Return the embedded assets, building them first unless ``cache_dir`` already holds them.

    Args:
        cache_dir: where assets live; default ``default_cache_dir()``.
        seed: seeds the task's rows, the model's initialisation and the warm-up's batches.
        recipe: sizes and warm-up settings; default ``EmbeddedRecipe()``.
        log: receives one-line progress messages.
    """
    recipe = recipe or EmbeddedRecipe()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / recipe_key(recipe, seed)
    if root.is_dir():
        problem = damage(root)
        if not problem:
            log(f"embedded: reusing {root}")
            return _assets(root)
        log(f"embedded: {problem}; rebuilding {root}")
        _discard(root, cache_dir)

    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"embedded: building {root} (once; later runs reuse it)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=cache_dir))
    try:
        build_assets(tmp, recipe, seed, log)
        try:
            tmp.rename(root)  # atomic; fails if a concurrent build got there first
        except OSError:
            if not root.is_dir():
                raise
            log(f"embedded: another process built {root} first; using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"embedded: built in {time.perf_counter() - start:.0f} s")
    return _assets(root)
