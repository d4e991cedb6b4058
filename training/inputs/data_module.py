"""Preference rows -> tokenized features -> ``PreferenceBatch`` loaders.

The features come prepared from Arrow (``training.inputs.prepared``, read through
``training.inputs.features.FeatureRows``) or as lists of dicts. Tokenization and truncation are
``dpo_core.data``'s, collation ``dpo_core.collate``'s.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from dpo_core.collate import PreferenceCollator
from training.inputs.features import pair_length as pair_length  # re-exported: callers find it here
from training.inputs.features import pair_lengths, token_fingerprint

log = logging.getLogger(__name__)


def split_heldout(
    rows: list[dict], fraction: float, seed: int, max_rows: int | None = None
) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint (train, held-out) split; held-out gets ``ceil``-free ``int`` share >= 1,
    at most ``max_rows`` (the rest train)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction)) if fraction > 0 and len(rows) > 1 else 0
    n_eval = n_eval if max_rows is None else min(n_eval, max_rows)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [rows[i] for i in train], [rows[i] for i in held]


def features_fingerprint(features) -> str:
    """sha256 over every feature's token ids: changes whenever the tokenized data changes
    (``training.inputs.features.token_fingerprint``)."""
    return token_fingerprint(features)


@dataclass
class PreferenceData:
    """Tokenized train and held-out features plus what was dropped on the way (lists of feature
    dicts, or ``training.inputs.features.FeatureRows`` read from Arrow)."""

    train: Sequence[dict]
    heldout: Sequence[dict]
    dropped: dict[str, int] = field(default_factory=dict)


# Length grouping sorts windows of this many global batches (transformers' LengthGroupedSampler).
GROUP_WINDOW_BATCHES = 50


def group_by_length(order: list[int], lengths: list[int], batch_rows: int) -> list[int]:
    """``order`` with rows of similar ``lengths`` next to each other, ``batch_rows`` at a time.

    ``order`` is cut into windows of ``GROUP_WINDOW_BATCHES * batch_rows`` rows; each window is
    sorted longest first (ties keep their order), so consecutive ``batch_rows`` rows, one batch,
    have similar lengths and need little padding. Every row stays in the epoch exactly once and
    the windows keep their place, so a shuffled order stays shuffled at the window scale.
    """
    window = GROUP_WINDOW_BATCHES * batch_rows
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
    return grouped


class EpochSampler(Sampler[int]):
    """This process's rows of one epoch, in order.

    The epoch's order is ``0..N-1``, or when shuffling a permutation seeded by ``seed + epoch``
    (as accelerate's ``SeedableRandomSampler`` under transformers' Trainer). Lightning calls
    ``set_epoch`` at every epoch start, so epoch e's order depends on (seed, e) only, not on how
    many epochs this process has run: a resumed run sees the same order. With ``world_size``
    processes, process ``rank`` takes every ``world_size``-th row from position ``rank`` (the
    order padded by its own head to a multiple, as ``DistributedSampler``), so the processes'
    k-th batches together are the k-th batch of one process with ``world_size`` times the
    batch size: same rows, same order, with shuffling on or off.

    With ``lengths`` (one per row) and ``batch_size``, the order is length-grouped
    (``group_by_length``) with global batches of ``batch_size * world_size`` rows.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {num_rows} rows")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.lengths, self.batch_size = lengths, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size * self.world_size)
        padded = (order * self.world_size)[: len(self) * self.world_size]
        return iter(padded[self.rank :: self.world_size])

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.world_size)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    ``state_dict`` counts the batches handed out in the current epoch; after ``load_state_dict``
    the next iteration skips that many, so a run resumed mid-epoch continues with the batch an
    uninterrupted run would have seen next (the order itself comes from ``EpochSampler``).

    It draws the seed of its workers from a generator of its own, seeded with ``seed + epoch``
    at each epoch, not from torch's global one: starting an epoch then leaves the global state,
    which dropout draws from, alone, and a resumed run's dropout matches (``training.run.rng``).
    """

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self._seed = seed
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Iterator:
        # A generator: nothing runs until the first batch is asked for, which is after
        # Lightning's set_epoch and load_state_dict.
        self.generator.manual_seed(self._seed + getattr(self.sampler, "epoch", 0))
        skip, self._skip = self._skip, 0
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        # At the end of an epoch the next one starts from its first batch.
        return {"batches_served": self._served % max(1, len(self))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_served", 0))


class PreferenceDataModule(L.LightningDataModule):
    """Train / validation loaders of ``PreferenceBatch`` for already-tokenized features."""

    def __init__(self, data: PreferenceData, tokenizer, cfg) -> None:
        super().__init__()
        self.data = data
        self.cfg = cfg
        self.collator = PreferenceCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=cfg.data.max_length,
            truncation_mode=cfg.data.truncation_mode,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning's own distributed sampler is off (make_trainer): it always shuffles.
        trainer = self.trainer
        sampler = EpochSampler(
            len(self.data.train),
            seed=self.cfg.trainer.seed,
            shuffle=self.cfg.data.shuffle,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            lengths=self._train_lengths() if self.cfg.data.group_by_length else None,
            batch_size=self.cfg.trainer.batch_size,
        )
        return ResumableDataLoader(
            self.data.train,
            batch_size=self.cfg.trainer.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.cfg.trainer.num_workers,
            seed=self.cfg.trainer.seed,
        )

    def _train_lengths(self) -> list[int]:
        return pair_lengths(self.data.train, self.cfg.data.max_length)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.data.heldout,
            batch_size=self.cfg.trainer.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.cfg.trainer.num_workers,
        )
