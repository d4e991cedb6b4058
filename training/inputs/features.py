"""Tokenized pairs read from Arrow on disk: a list of features that holds O(1) memory per row.

:class:`FeatureRows` is what ``PreferenceData.train`` / ``.heldout`` hold: a sequence whose item
``i`` is the dict ``dpo_core.collate.PreferenceCollator`` takes, ``{"prompt_ids", "chosen_ids",
"rejected_ids", "index": i}`` (plus ``ref_chosen_logps`` / ``ref_rejected_logps`` once a
precomputed reference has set them), read from the memory-mapped prepared set when asked for.
It holds the positions of its rows in that set (8 bytes a row), not their tokens. Code that
takes plain lists of feature dicts (tests, parity) takes it unchanged; :func:`pair_lengths`,
:func:`token_fingerprint` and :func:`set_reference_logps` use its columns directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow.compute as pc

from training.inputs.row_prep import TOKEN_COLUMNS

# Rows read from Arrow at a time by the whole-set passes.
PASS_ROWS = 4096


class FeatureRows(Sequence):
    """Rows ``positions`` of a prepared ``datasets.Dataset``, as feature dicts."""

    def __init__(self, dataset, positions: Sequence[int]) -> None:
        self._dataset = dataset.select_columns(list(TOKEN_COLUMNS))
        self._positions = np.asarray(positions, dtype=np.int64)
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"feature {i} of {len(self)}")
        return self.__getitems__([i % len(self)])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Several features in one read (torch's DataLoader asks for a batch this way)."""
        table = self._dataset.data.fast_gather(self._positions[np.asarray(indices)])
        columns = {name: table.column(name).to_pylist() for name in TOKEN_COLUMNS}
        out = []
        for k, i in enumerate(indices):
            feature = {name: columns[name][k] for name in TOKEN_COLUMNS}
            feature["index"] = int(i)
            if self._reference is not None:
                feature["ref_chosen_logps"] = float(self._reference[0][i])
                feature["ref_rejected_logps"] = float(self._reference[1][i])
            out.append(feature)
        return out

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), PASS_ROWS):
            yield from self.__getitems__(list(range(start, min(start + PASS_ROWS, len(self)))))

    def token_lengths(self) -> dict[str, np.ndarray]:
        """Tokens of each row's prompt, chosen and rejected completion, by column name."""
        out = {name: np.empty(len(self), dtype=np.int64) for name in TOKEN_COLUMNS}
        for start, table in self.tables():
            for name in TOKEN_COLUMNS:
                lengths = pc.list_value_length(table.column(name)).to_numpy()
                out[name][start : start + len(lengths)] = lengths
        return out

    def tables(self) -> Iterator[tuple[int, object]]:
        """``(first row, Arrow table)`` of every ``PASS_ROWS`` rows, in order."""
        for start in range(0, len(self), PASS_ROWS):
            chunk = self._positions[start : start + PASS_ROWS]
            yield start, self._dataset.data.fast_gather(chunk)

    def set_reference(self, chosen: np.ndarray, rejected: np.ndarray) -> None:
        self._reference = (np.asarray(chosen, np.float64), np.asarray(rejected, np.float64))


def pair_length(feature: dict, max_length: int | None) -> int:
    """Tokens of one pair, prompt + chosen + rejected, each sequence cut to ``max_length``."""
    prompt = len(feature["prompt_ids"])

    def row(completion: str) -> int:
        n = prompt + len(feature[completion])
        return n if max_length is None else min(n, max_length)

    return row("chosen_ids") + row("rejected_ids") - prompt


def pair_lengths(features: Sequence[dict], max_length: int | None) -> list[int]:
    """Tokens of each pair, prompt + chosen + rejected, each sequence cut to ``max_length``
    (``training.inputs.data_module.pair_length`` of every feature)."""
    if not isinstance(features, FeatureRows):
        return [pair_length(f, max_length) for f in features]
    n = features.token_lengths()
    prompt = n["prompt_ids"]
    chosen, rejected = prompt + n["chosen_ids"], prompt + n["rejected_ids"]
    if max_length is not None:
        chosen, rejected = np.minimum(chosen, max_length), np.minimum(rejected, max_length)
    return (chosen + rejected - prompt).tolist()


def token_fingerprint(features: Sequence[dict]) -> str:
    """sha256 over every feature's token ids (as int64 bytes, ``|`` after each sequence):
    changes whenever the tokenized data changes."""
    digest = hashlib.sha256()
    if not isinstance(features, FeatureRows):
        for f in features:
            for key in TOKEN_COLUMNS:
                digest.update(np.asarray(f[key], dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()
    for _, table in features.tables():
        columns = [table.column(name).combine_chunks() for name in TOKEN_COLUMNS]
        values = [c.flatten().to_numpy().astype(np.int64) for c in columns]
        offsets = [c.offsets.to_numpy() - c.offsets[0].as_py() for c in columns]
        for row in range(table.num_rows):
            for v, o in zip(values, offsets, strict=True):
                digest.update(v[o[row] : o[row + 1]].tobytes() + b"|")
    return digest.hexdigest()


def set_reference_logps(features: Sequence[dict], chosen, rejected) -> None:
    """Give feature ``i`` its reference log-probs ``chosen[i]``, ``rejected[i]``."""
    if isinstance(features, FeatureRows):
        features.set_reference(np.asarray(chosen), np.asarray(rejected))
        return
    for i, f in enumerate(features):
        f["ref_chosen_logps"] = float(chosen[i])
        f["ref_rejected_logps"] = float(rejected[i])
