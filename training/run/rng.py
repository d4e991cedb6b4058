"""The random-number state a checkpoint carries, so that ``--resume`` continues bit for bit.

Training draws random numbers for dropout (torch's CPU generator, or CUDA's on a GPU); numpy's
and Python's generators are saved too, for any code that draws from them. The data order does
not draw from these: ``EpochSampler`` seeds its own generator with ``seed + epoch``, the loader
its own (``ResumableDataLoader``), and Lightning's checkpoint holds the epoch and the position in
it. Each process saves its own state (gathered into the checkpoint that rank zero writes) and a
resumed process restores its own, just before the first batch it trains: whatever drew random
numbers while the run was set up again (a LoRA adapter's initialisation) does not count.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def collect() -> dict:
    """This process's generator states, in types a ``weights_only`` load accepts (Lightning
    loads checkpoints so): numpy's key array as a tensor."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict) -> None:
    """Put back the states ``collect`` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def collect_all_ranks() -> list[dict]:
    """Every process's states, by global rank (a collective when several processes train)."""
    mine = collect()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def for_rank(saved: list[dict] | None, rank: int) -> dict | None:
    """This process's states from a checkpoint's list; None (with a warning) if it has none."""
    if not saved:
        log.warning("--resume: the checkpoint holds no random-number state; dropout will differ")
        return None
    if rank >= len(saved):
        log.warning("--resume: no random-number state for process %d; dropout will differ", rank)
        return None
    return saved[rank]
