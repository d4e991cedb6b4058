"""Fixtures of the training integration tests: a tiny local model directory and preference file.

Nothing here uses the embedded default: each session builds its own 1-layer Llama (hidden 64)
with a tokenizer trained offline on the rows and on hh-rlhf text (vocabulary 1,000), saves both
with ``save_pretrained``, and writes 32 explicit ``prompt`` / ``chosen`` / ``rejected`` rows
(completions start with a space, so the prompt's tokens are a prefix of prompt + completion) to
a jsonl file. Runs go through the real entry points (``training.fit.run`` / ``main`` /
``python -m training.fit``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, TORCH_DEFAULT_THREADS, load_hh_rows

SUBJECTS = ("cat", "dog", "tree", "river", "city", "song", "book", "garden")
GOOD = ("lovely", "kind", "bright", "warm", "gentle")
BAD = ("awful", "cruel", "dull", "cold", "harsh")
NUM_ROWS = 32


@pytest.fixture(autouse=True)
def torch_default_threads():
    """Each training test runs in-process at torch's default thread count, as the child runs it
    starts do (``fit_subprocess``): modules elsewhere pin one thread at import, and on some CPUs
    (AVX-512) the thread count changes float32 results, so a bit-for-bit resume that compares an
    in-process run with a child's would compare two thread layouts."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class TinyAssets:
    """A local model directory (weights + tokenizer) and a local jsonl of preference rows."""

    model_dir: Path
    data_file: Path


def preference_rows(n: int = NUM_ROWS, seed: int = 0) -> list[dict]:
    """``n`` explicit rows: a kind description is chosen over an unkind one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        rows.append(
            {
                "prompt": f"Describe the {subject}.",
                "chosen": " It is " + " ".join(rng.sample(GOOD, 3)) + ".",
                "rejected": " It is " + " ".join(rng.sample(BAD, 3)) + ".",
            }
        )
    return rows


def build_tiny_model(model_dir: Path, rows: list[dict]) -> None:
    """A seeded 1-layer LlamaForCausalLM and its tokenizer (trained on ``rows`` and on hh-rlhf
    text, so both tokenize compactly), saved to ``model_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.embedded.tokenizer import train_tokenizer

    texts = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
    texts += [r[k] for r in load_hh_rows(200) for k in ("chosen", "rejected")]  # for --dataset hh
    tokenizer = train_tokenizer(texts, vocab_size=1000)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # bitsandbytes quantizes in blocks of 64: every weight fills whole blocks
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    root = tmp_path_factory.mktemp("tiny-assets")
    rows = preference_rows()
    data_file = root / "prefs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tiny_model(root / "model", rows)
    return TinyAssets(model_dir=root / "model", data_file=data_file)


def base_args(assets: TinyAssets, output_dir: Path, **flags) -> list[str]:
    """argv for a short CPU run on the tiny assets; ``flags`` add or override options
    (``max_steps=3`` -> ``--max-steps 3``; True -> ``--flag``, False -> ``--no-flag``)."""
    options = {
        "model": assets.model_dir,
        "dataset": assets.data_file,
        "output_dir": output_dir,
        "accelerator": "cpu",
        "max_steps": 3,
        "batch_size": 4,
        "eval_fraction": 0.0,
        "evaluate": False,
        "shuffle": False,
        "seed": 0,
        "max_length": 64,
    }
    options.update(flags)
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def fit(argv: list[str]):
    """``training.fit.run`` in this process on a config resolved from ``argv``."""
    from training.base.cli import resolve_config
    from training.fit import run

    cfg, _ = resolve_config(argv)
    return run(cfg)


def fit_subprocess(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m training.fit argv`` in a child process, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "training.fit", *argv],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_env() -> dict[str, str]:
    """The environment of a child run: offline, quiet, two threads (what this machine has)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT))
    return env


def read_metrics(output_dir: Path) -> list[dict[str, float]]:
    """The rows of ``<output_dir>/metrics.csv`` as floats, one per optimizer step."""
    with open(Path(output_dir) / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [r for r in rows if "loss" in r]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``<model_dir>/*.safetensors`` (full model or adapter)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def base_name(peft_name: str) -> str:
    """peft's name of a base-model tensor -> the plain model's name."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def dequantized(module) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit layer computes with, whatever its storage layout
    (bitsandbytes may have repacked it for CPU inference: ``training.inputs.four_bit``)."""
    from bitsandbytes import functional as F

    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
    return F.dequantize_4bit(data, state).float()


def fixed_batch(assets: TinyAssets, num_pairs: int = 8):
    """The first ``num_pairs`` rows of the data file, tokenized and collated as training does."""
    from dpo_core.collate import PreferenceCollator
    from dpo_core.data import tokenize_rows
    from dpo_core.rows import read_jsonl
    from training.inputs.model_loading import load_tokenizer

    tokenizer = load_tokenizer(str(assets.model_dir))
    rows = read_jsonl(assets.data_file)[:num_pairs]
    features = tokenize_rows(rows, tokenizer, max_length=64).rows
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=64)(features)


# Per-step metrics of two runs that see the same rows through differently shaped computations
# (8 pairs x 1 micro-batch vs 1 x 8, 2 processes x 2 pairs vs 1 x 4, a cached vs a live
# reference): float32 sums of ~20 token log-probs, reordered and padded differently. Measured
# differences are <= 8e-6 on ~65-nat logps (~1e-7 relative) and <= 4e-7 on loss, rewards and
# grad_norm; 1e-5 (relative and absolute) keeps a >= 10x margin, while a changed row, a dropped
# micro-batch or a gradient scaled by the accumulation count moves them by >= 1e-2.
STEP_TOL = 1e-5
STEP_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
)


def assert_steps_close(
    ours: list[dict], theirs: list[dict], keys=STEP_KEYS, tol: float = STEP_TOL
) -> None:
    """Same number of optimizer steps, and every ``keys`` metric equal within ``tol`` (relative
    and absolute)."""
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=tol, abs_tol=tol), (
                f"step {step} {key}: {a[key]} vs {b[key]}"
            )


# Final weights of two such runs. Adam divides each update by the root of its own squared
# gradient, so an element whose gradient is float32 noise moves by up to ~lr either way: no
# per-element tolerance both holds and means something. Per tensor, the runs' difference must be
# under 1e-3 of the distance the weights travelled (measured: <= 8e-5); a run on other rows, or
# with a lost micro-batch, differs by O(1) of it.
WEIGHTS_REL_TOL = 1e-3


def assert_weights_close(ours: Path, theirs: Path, start: Path) -> None:
    """The saved weights of two runs agree relative to how far training moved them."""
    a, b, w0 = load_weights(ours), load_weights(theirs), load_weights(start)
    assert a.keys() == b.keys() == w0.keys()
    for name in a:
        travelled = torch.linalg.vector_norm(a[name] - w0[name])
        assert travelled > 0, f"{name} did not train"
        diff = torch.linalg.vector_norm(a[name] - b[name])
        assert diff <= WEIGHTS_REL_TOL * travelled, f"{name}: {diff} vs {travelled}"
