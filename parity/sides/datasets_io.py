"""Preference data for parity runs: a user's file, the real hh-rlhf file, or generated rows.

The row shapes are ``dpo_core.rows``'s (explicit, implicit, conversational; the module docstring
there has the table); files are read by ``training.inputs.sources.load_rows``. The generated sets
are deterministic in their seed and are written (``dpo_core.rows.write_jsonl``) to the case's work
directory so both sides read the very same file.
"""

from __future__ import annotations

import pathlib
import random

from dpo_core.rows import DataError, read_jsonl, validate_rows
from training.inputs.sources import read_source

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HH_RLHF_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# Word lists of the generated rows (split strings read better than 50-line list literals).
_NOUNS = "cat river lamp garden engine violin planet bridge candle forest letter market".split()  # noqa: SIM905
_ADJS = "red quiet heavy bright ancient narrow warm hollow gentle sharp".split()  # noqa: SIM905
_WORDS = (  # noqa: SIM905
    "the a it is was very not quite always never maybe because and but so then "
    "blue green small large early late soft loud fast slow clear dark"
).split()


def load_preference_rows(path: str | pathlib.Path) -> list[dict]:
    """The rows of a preference file (``training.inputs.sources.read_source``: .jsonl, .json,
    .parquet, .csv), checked to be valid rows of one shape (``dpo_core.rows.validate_rows``), as
    trl's side needs them.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: an unsupported or unreadable file, or a bad row, naming the file, the row's own
            line (JSON lines) or data row (the others) and the field.
    """
    src = read_source(path)
    try:
        validate_rows(src.rows, source=src.source)
    except DataError as err:
        if err.index is None:
            raise
        raise err.at(src.places[err.index]) from None
    return src.rows


def generate_rows(shape: str, n: int, seed: int) -> list[dict]:
    """``n`` deterministic preference rows of ``shape`` (explicit, implicit, conversational,
    hh-rlhf). Completions start with a space and differ in length, so padding is exercised; the
    implicit rows split where trl's character-level prefix search splits them."""
    if shape == "hh-rlhf":
        return load_hh_rows(n)
    if shape == "hh-rlhf-chat":
        return [hh_conversation(row, system=i % 2 == 0) for i, row in enumerate(load_hh_rows(n))]
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
    rows = read_jsonl(HH_RLHF_FILE)[:n]
    rows = [{"chosen": row["chosen"], "rejected": row["rejected"]} for row in rows]
    validate_rows(rows, source=str(HH_RLHF_FILE))
    return rows


HH_SYSTEM = "You are a helpful and harmless assistant."


def hh_turns(text: str) -> list[dict]:
    """An hh-rlhf dialogue ``"\n\nHuman: ...\n\nAssistant: ..."`` as chat messages."""
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = []
    for part in text.split("\n\n"):
        speaker, sep, content = part.partition(": ")
        if sep and speaker in roles:
            messages.append({"role": roles[speaker], "content": content.strip()})
        elif messages:  # a paragraph break inside a turn
            messages[-1]["content"] += "\n\n" + part.strip()
    return messages


def hh_conversation(row: dict, system: bool) -> dict:
    """An hh-rlhf row as a multi-turn conversational row: every turn before the final assistant
    answer is the prompt (with a system message first when ``system``), the two final answers
    are chosen and rejected.

    Raises:
        ValueError: when the two dialogues do not share their turns before the final answer.
    """
    chosen, rejected = hh_turns(row["chosen"]), hh_turns(row["rejected"])
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
        raise ValueError("hh-rlhf row: chosen and rejected differ before the final answer")
    prompt = ([{"role": "system", "content": HH_SYSTEM}] if system else []) + chosen[:-1]
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


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
