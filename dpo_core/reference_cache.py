"""Precomputed reference log-probs on disk: written atomically, keyed by everything that
determines them (``reference_cache_key``: weights, tokenizer, data, truncation, dtype, ``ld_alpha``,
precision), verified when read back; a stale, foreign or damaged file is refused, never used.

``dpo:N`` are lines of trl 1.16.0's trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dpo_core.reference import check_rows_once

CACHE_FORMAT = "dpo-reference-logps-v1"


def _update_with_weights(h: hashlib._Hash, model: nn.Module) -> None:
    """Feed every state_dict entry (name, dtype, shape, raw bytes) to ``h``, in name order.

    For a peft model the state_dict holds the base weights and the adapters; for a 4-bit model,
    the packed weights and their quantization state.
    """
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode())
            continue
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(raw.numpy())


def tokenizer_identity(tokenizer) -> str:
    """Everything that decides token ids: the full backend (vocab, merges, normalizer, BOS/EOS
    post-processor) when there is one, the vocabulary, special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else None,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return json.dumps(identity, sort_keys=True, default=str)


@dataclass(frozen=True)
class CacheSettings:
    """The run's settings that change the reference log-probs (besides weights, tokenizer, data).

    ``precision`` is Lightning's name: ``bf16-mixed`` log-probs differ from float32 ones.
    """

    max_length: int | None
    truncation_mode: str
    dtype: str
    ld_alpha: float | None
    precision: str = "32-true"


def reference_cache_key(
    model: nn.Module, *, tokenizer, data_fingerprint: str, settings: CacheSettings
) -> str:
    """sha256 hex digest of everything the precomputed reference log-probs depend on.

    ``model`` is the model the reference runs (the frozen copy, or the PeftModel whose adapters
    are switched off: its state_dict, adapters included, is hashed; compute the key before
    training). ``data_fingerprint`` identifies the rows (e.g. a datasets fingerprint or a hash of
    the file). Like trl's cache key (dpo:979-982, 1174-1183: dataset fingerprint + weight hash),
    plus the tokenizer and ``settings``.
    """
    h = hashlib.sha256(CACHE_FORMAT.encode())
    fields = {"data_fingerprint": data_fingerprint, **asdict(settings)}
    fields["dtype"] = str(fields["dtype"])
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    _update_with_weights(h, model)
    return h.hexdigest()


def save_reference_cache(
    path: str | os.PathLike,
    key: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """Write the values for rows ``index`` (all (N,)) and their ``key`` to ``path`` atomically:
    through a temporary file and a rename. A failed write (a full disk) removes the temporary
    file and raises an ``OSError`` whose ``filename`` is ``path``."""
    shapes = {tuple(t.shape) for t in (chosen, rejected, index)}
    if len(shapes) != 1 or chosen.dim() != 1:
        raise ValueError(
            f"save_reference_cache: chosen, rejected, index must be (N,) alike, got "
            f"{tuple(chosen.shape)}, {tuple(rejected.shape)}, {tuple(index.shape)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CACHE_FORMAT,
        "key": key,
        "chosen": chosen.detach().float().cpu(),
        "rejected": rejected.detach().float().cpu(),
        "index": index.detach().long().cpu(),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of one run may race
    buffer = io.BytesIO()  # serialized first: a failed write is then Python's own OSError
    torch.save(payload, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk: "[Errno 28] No space left on device: '<path>'"
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_reference_cache(
    path: str | os.PathLike, expected_key: str, expected_num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (N,), rejected (N,)) in row order, from a cache written for exactly this run.

    Refuses (ValueError naming the file) a file torch cannot read (torn, truncated, not a torch
    file), a cache of another format or without its tensors, another key (model weights,
    tokenizer, data, truncation, dtype or ld_alpha changed), another row count, an index that is
    not every row once, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference cache {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torn, truncated or not torch's format: zip, pickle or EOF errors
        text = str(err).strip()
        cause = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise ValueError(f"reference cache {path}: unreadable ({cause})") from err
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"reference cache {path}: format {found!r}, expected {CACHE_FORMAT!r}")
    tables = ("chosen", "rejected", "index")
    if not all(isinstance(payload.get(name), torch.Tensor) for name in tables):
        raise ValueError(f"reference cache {path}: lacks the tensors {', '.join(tables)}")
    if payload.get("key") != expected_key:
        raise ValueError(
            f"reference cache {path} is stale: written for key {str(payload.get('key'))[:16]}…, "
            f"this run needs {expected_key[:16]}… (the model weights, tokenizer, data, "
            "max_length, truncation_mode, dtype or ld_alpha differ). Delete it to recompute."
        )
    chosen, rejected, index = payload["chosen"], payload["rejected"], payload["index"]
    alike = chosen.dim() == 1 and chosen.shape == rejected.shape == index.shape
    if not alike or index.is_floating_point():
        raise ValueError(f"reference cache {path}: chosen, rejected and index do not match")
    if chosen.shape[0] != expected_num_rows:
        raise ValueError(
            f"reference cache {path} holds {chosen.shape[0]} rows, the data has {expected_num_rows}"
        )
    check_rows_once(index, expected_num_rows, f"reference cache {path}")
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise ValueError(f"reference cache {path} holds non-finite log-probs")
    order = torch.argsort(index)
    return chosen[order], rejected[order]
