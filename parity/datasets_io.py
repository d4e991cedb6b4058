"""Preference data for parity runs: local files in any of the three shapes, or generated rows.

Shapes (as trl names them):

- explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
- implicit prompt: ``{"chosen": str, "rejected": str}``, the prompt being their common prefix;
- conversational: the same keys holding lists of ``{"role": str, "content": str}`` messages.

Files (.jsonl/.json/.parquet/.csv, optionally .gz for json) are read into rows. The
generated sets are deterministic in their seed and are written to the case's work directory so
both sides read the very same file.
"""

from __future__ import annotations

import csv
import gzip
import json
import pathlib
import random

import pyarrow.parquet as pq

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HH_RLHF_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# Word lists of the generated rows (split strings read better than 50-line list literals).
_NOUNS = "cat river lamp garden engine violin planet bridge candle forest letter market".split()  # noqa: SIM905
_ADJS = "red quiet heavy bright ancient narrow warm hollow gentle sharp".split()  # noqa: SIM905
_WORDS = (  # noqa: SIM905
    "the a it is was very not quite always never maybe because and but so then "
    "blue green small large early late soft loud fast slow clear dark"
).split()


def load_preference_rows(path: str | pathlib.Path) -> list[dict]:
    """Read a preference file into a list of rows and check its shape (``validate_rows``).

    .jsonl holds one JSON object per line; .json a list of objects, an object of equal-length
    columns, or JSON lines; both may be gzipped (.gz). .parquet is read with pyarrow (the
    format ``datasets`` stores), .csv with a header row (every cell a string). The path is
    used literally (``datasets.load_dataset`` would read ``[`` or ``*`` in it as a glob).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the suffix is not .jsonl/.json/.parquet/.csv (json may be .gz), or a row is
            malformed (the message names the file, the row and the field).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file {path} not found")
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if suffix in (".jsonl", ".json"):
        rows = _read_json(path)
    elif suffix == ".parquet" and path.suffix != ".gz":
        rows = pq.read_table(path).to_pylist()
    elif suffix == ".csv" and path.suffix != ".gz":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or .csv")
    validate_rows(rows, str(path))
    return rows


def _read_json(path: pathlib.Path) -> list[dict]:
    """Rows of a JSON file: a list of objects, an object of columns, or JSON lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not one JSON document: JSON lines
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        chosen = data.get("chosen")
        if not (isinstance(chosen, list) and not any(isinstance(x, dict) for x in chosen)):
            return [data]  # one row (a conversational row's chosen is a list of messages)
        lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: columns of different lengths or non-list columns")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i} is not valid JSON: {exc.msg}") from exc
    return rows


def validate_rows(rows: list[dict], source: str) -> str:
    """Check that ``rows`` are preference pairs of one shape, and return that shape.

    Returns:
        ``"explicit"`` or ``"implicit"``, prefixed by ``"conversational-"`` for message lists.

    Raises:
        ValueError: naming ``source``, the row index and the field that is wrong.
    """
    if not rows:
        raise ValueError(f"{source}: no rows")
    first = rows[0] if isinstance(rows[0], dict) else {}
    fields = ("prompt", "chosen", "rejected") if "prompt" in first else ("chosen", "rejected")
    conversational = isinstance(first.get("chosen"), list)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i}: expected an object, got {type(row).__name__}")
        for name in fields:
            if name not in row or row[name] is None:
                raise ValueError(f"{source}: row {i}: missing field {name!r}")
            _check_value(row[name], conversational, f"{source}: row {i}, field {name!r}")
    shape = "explicit" if "prompt" in fields else "implicit"
    return f"conversational-{shape}" if conversational else shape


def _check_value(value: object, conversational: bool, where: str) -> None:
    """A field is a non-empty string, or (conversational) a list of role/content messages."""
    if not conversational:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
        return
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {value!r:.80}")
    for j, message in enumerate(value):
        ok = isinstance(message, dict) and all(
            isinstance(message.get(k), str) for k in ("role", "content")
        )
        if not ok:
            raise ValueError(f"{where}, message {j}: expected {{'role': str, 'content': str}}")


def generate_rows(shape: str, n: int, seed: int) -> list[dict]:
    """``n`` deterministic preference rows of ``shape`` (explicit, implicit, conversational,
    hh-rlhf). Completions start with a space and differ in length, so padding is exercised; the
    implicit rows split where trl's character-level prefix search splits them."""
    if shape == "hh-rlhf":
        return load_hh_rows(n)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = f"Question {i}: why is the {rng.choice(_NOUNS)} so {rng.choice(_ADJS)}?"
        chosen = " " + " ".join(rng.choices(_WORDS, k=rng.randint(3, 12))) + "."
        rejected = " " + " ".join(rng.choices(_WORDS, k=rng.randint(2, 15))) + "!"
        if shape == "explicit":
            rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        elif shape == "implicit":
            rows.append({"chosen": question + chosen, "rejected": question + rejected})
        elif shape == "conversational":
            rows.append(_conversation(question, chosen.strip(), rejected.strip(), two_turns=i % 2))
        else:
            raise ValueError(f"unknown data shape {shape!r}")
    return rows


def _conversation(question: str, chosen: str, rejected: str, two_turns: int) -> dict:
    """One conversational row; odd rows carry an earlier exchange in the prompt."""
    prompt = [{"role": "user", "content": question}]
    if two_turns:
        earlier = [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hello, how can I help?"},
        ]
        prompt = earlier + prompt
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def load_hh_rows(n: int) -> list[dict]:
    """The first ``n`` rows of the real hh-rlhf harmless-base test file (implicit prompts)."""
    if not HH_RLHF_FILE.is_file():
        raise FileNotFoundError(f"hh-rlhf data not found at {HH_RLHF_FILE}")
    rows = []
    with gzip.open(HH_RLHF_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            if len(rows) == n:
                break
            row = json.loads(line)
            rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    validate_rows(rows, str(HH_RLHF_FILE))
    return rows


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """Every text of ``rows`` (message contents for conversational rows), to train a tokenizer."""
    texts = []
    for row in rows:
        for name in ("prompt", "chosen", "rejected"):
            value = row.get(name)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(m["content"] for m in value)
    return texts


def write_jsonl(rows: list[dict], path: pathlib.Path) -> None:
    """Write ``rows`` one JSON object per line (UTF-8, keys in row order)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
