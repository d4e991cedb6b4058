"""The cache of prepared (tokenized) sources on disk: where it lives, its key, reading it back.

An entry is a directory ``<cache>/<key>/`` holding the Arrow shards ``Dataset.map`` wrote and a
``meta.json`` written last, atomically: an entry without it never finished. The key is a sha256
of everything that decides the records (``training.inputs.row_prep``):

- the data's content (``raw_sources.content_fingerprint``: its bytes, or datasets' fingerprint),
- the split and ``--max-rows`` (which rows are read),
- the tokenizer (vocabulary, merges, special tokens, chat template:
  ``dpo_core.reference_cache.tokenizer_identity``),
- every setting that changes the tokens: ``--max-length``, ``--truncation-mode``, the column
  names, and this format's version.

The cache lives in ``--dataset-cache-dir``, else ``$DPO_DATA_CACHE``, else
``~/.cache/dpo/data``. An entry that cannot be read back (a missing or torn file, another
format) is reported in one line and prepared again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from dpo_core.reference_cache import tokenizer_identity
from dpo_core.rows import DataError, Place
from training.base.errors import replaced_atomically

CACHE_FORMAT = "dpo-prepared-v1"
META = "meta.json"


def cache_root(configured: str | None) -> Path:
    """``--dataset-cache-dir``, else ``$DPO_DATA_CACHE``, else ``~/.cache/dpo/data``."""
    chosen = configured or os.environ.get("DPO_DATA_CACHE")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "dpo" / "data"


def prepared_key(content: str, tokenizer, settings: dict) -> str:
    """sha256 hex of the data's content fingerprint, the tokenizer and ``settings``."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(json.dumps({"content": content, **settings}, sort_keys=True).encode())
    digest.update(tokenizer_identity(tokenizer).encode())
    return digest.hexdigest()


@dataclass
class CacheMeta:
    """What an entry records besides its rows.

    Attributes:
        source: the source's name in messages.
        num_read: entries read (rows and malformed entries skipped).
        skipped: the errors of the entries skipped while reading, as dicts.
        shards: the Arrow files, in row order, with their sizes in bytes.
        num_rows: records in all shards together.
    """

    source: str
    num_read: int
    num_rows: int
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def error_to_dict(err: DataError) -> dict:
    return {
        "detail": err.detail,
        "reason": err.reason,
        "field": err.field,
        "line": err.line,
        "row": err.row,
    }


def error_from_dict(saved: dict, source: str) -> DataError:
    place = Place(line=saved["line"], row=saved["row"])
    return DataError(
        saved["detail"], source=source, reason=saved["reason"], field=saved["field"], place=place
    )


def write_meta(directory: Path, key: str, meta: CacheMeta) -> None:
    """``meta.json`` of a finished entry: written last, atomically."""
    text = json.dumps({"format": CACHE_FORMAT, "key": key, **meta.__dict__}, indent=1)
    with replaced_atomically(directory / META) as tmp:
        tmp.write_text(text)


def read_entry(directory: Path, key: str):
    """The prepared ``datasets.Dataset`` and :class:`CacheMeta` of a finished entry, or None when
    there is none.

    Raises:
        ValueError: the entry cannot be used (a torn or missing file, another format or key);
            the caller prepares the source again.
    """
    meta_path = directory / META
    if not meta_path.exists():
        return None
    try:
        saved = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{meta_path} is unreadable ({err})") from err
    if saved.get("format") != CACHE_FORMAT or saved.get("key") != key:
        raise ValueError(f"{meta_path} is of another format or key")
    meta = CacheMeta(**{k: v for k, v in saved.items() if k not in ("format", "key")})
    for shard in meta.shards:
        path = directory / shard["file"]
        size = path.stat().st_size if path.exists() else None
        if size != shard["bytes"]:
            raise ValueError(f"{path} has {size} bytes, {shard['bytes']} were written")
    try:
        parts = [datasets.Dataset.from_file(str(directory / s["file"])) for s in meta.shards]
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except Exception as err:  # pyarrow's errors for a damaged file
        raise ValueError(f"{directory} cannot be read back ({type(err).__name__}: {err})") from err
    if len(dataset) != meta.num_rows:
        raise ValueError(f"{directory} holds {len(dataset)} rows, {meta.num_rows} were written")
    return dataset, meta


def discard(directory: Path) -> None:
    """Remove an entry (unusable, or left by a run that stopped while writing it)."""
    shutil.rmtree(directory, ignore_errors=True)
