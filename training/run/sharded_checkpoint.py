"""Sharded checkpoints of ``--strategy fsdp``: ``last.ckpt`` is a directory, written atomically.

Each process writes its own shard of the weights and optimizer state (torch distributed
checkpoint, DCP, through Lightning's ``ModelParallelStrategy``); rank zero writes ``meta.pt``
beside them: everything else the checkpoint holds (step, loops, sampler position, learning-rate
schedule, random-number states of every process, the run record ``--resume`` compares). No
process ever holds the whole model to save it.

    checkpoints/last.ckpt/      .metadata  __0_0.distcp  __1_0.distcp  meta.pt

Atomic as the one-file checkpoints (``training.run.callbacks.AtomicCheckpointIO``): every
process writes into ``.last.ckpt.<token>.tmp/`` in the same folder, then rank zero moves the
checkpoint being replaced to ``previous.ckpt`` and the temporary to ``last.ckpt`` (two renames,
each atomic), once it finds every shard there (machines that do not share the file system
would leave a checkpoint without theirs: a ``RunError`` instead). A run killed while the shards are written leaves ``last.ckpt`` as it was; killed
between the two renames, it leaves no ``last.ckpt`` but the whole ``previous.ckpt``, which
``--resume`` takes with a note (``training.run.checkpoint_check``). Never a half checkpoint
under the name ``last.ckpt``.

A sharded checkpoint resumes under ``--strategy fsdp`` with any number of processes (DCP
reshards on load: ``--resume-allow-changes`` for the changed ``--devices``); without fsdp it is
refused in one line (``check_resumable``). A one-file checkpoint (a run without fsdp) resumes
under fsdp: its full state dict is scattered to the shards, its optimizer state first keyed by
parameter name (``by_name``: Lightning's own loader takes the i-th saved state for the model's
i-th parameter, but a plain optimizer numbers them in its groups' order, decayed weights first).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch
from lightning.fabric.strategies.model_parallel import _load_raw_module_state
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from training.base.errors import RunError
from training.run.callbacks import PREVIOUS_NAME, checkpoint_write_failure, read_checkpoint

META_NAME = _METADATA_FILENAME  # "meta.pt": Lightning's name for the non-tensor part


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory (sharded), not a one-file checkpoint."""
    return Path(path).is_dir()


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint, a file or a sharded directory; nothing if there is none."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path, previous: Path) -> None:
    """Put the finished checkpoint directory ``tmp`` at ``path``: the checkpoint there (a file
    or a directory) becomes ``previous`` first. Each step is one rename; see the module
    docstring for what a kill between them leaves."""
    for part in tmp.iterdir():
        _fsync(part)
    _fsync(tmp)
    remove_checkpoint(previous)  # normally gone already: removed before the write started
    if path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    _fsync(path.parent)


def publish_if_whole(tmp: Path, path: Path, previous: Path) -> str:
    """``publish`` the written checkpoint if every shard is in ``tmp``, else remove it and say
    why: processes on machines that do not share this file system wrote theirs elsewhere."""
    missing = missing_shards(tmp)
    if missing:
        remove_checkpoint(tmp)
        return (
            f"{path}: shard file(s) {', '.join(missing)} of other processes are not in "
            f"{path.parent}: under --strategy fsdp every process writes its shard there, so "
            "--output-dir must be on a file system all machines share"
        )
    publish(tmp, path, previous)
    remove_stale(path.parent, path.name)
    return ""


def remove_stale(folder: Path, name: str) -> None:
    """Temporaries a writer killed mid-save left behind (it runs no cleanup)."""
    for stale in folder.glob(f".{name}.*.tmp"):
        remove_checkpoint(stale)


class ShardedCheckpointStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with ``save_distributed_checkpoint=True``, each
    save made atomic (module docstring). Loading is Lightning's: a directory through DCP,
    resharded to this run's processes; a file as a full state dict scattered to the shards."""

    def __init__(self, data_parallel_size: int) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
        )

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """A sharded checkpoint through Lightning (DCP); a one-file one scattered to the shards,
        its optimizer state keyed by name (``by_name``). Returns the rest of the checkpoint
        (Lightning's own one-file branch, ``_load_checkpoint``, less its positional keys)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        saved = checkpoint["optimizer_states"]
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            named = by_name(state, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.{self.broadcast(secrets.token_hex(4))}.tmp")
        previous = path.with_name(PREVIOUS_NAME)
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_checkpoint(previous)  # at most two checkpoints on disk while writing
        self.barrier("sharded checkpoint: prepared")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except Exception as err:  # DCP raises on every process when any one fails
            if self.is_global_zero:
                remove_checkpoint(tmp)
            raise checkpoint_write_failure(path, err, no_space=False) from err
        self.barrier("sharded checkpoint: written")
        problem = publish_if_whole(tmp, path, previous) if self.is_global_zero else ""
        problem = self.broadcast(problem)  # every process stops on it, none waits on the others
        if problem:
            raise RunError(problem)


def by_name(state: dict, optimizer, model: torch.nn.Module) -> dict:
    """A one-file optimizer state (``{"state": {id: ...}, "param_groups": [{"params": [id,
    ...]}]}``) keyed by parameter name instead: the j-th id of saved group g is the j-th
    parameter of the optimizer's group g (the same groups, built the same way)."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = optimizer.param_groups
    if len(groups) != len(state["param_groups"]):
        raise RunError(
            f"--resume: the checkpoint's optimizer has {len(state['param_groups'])} parameter "
            f"group(s), this run's {len(groups)}"
        )
    name_of = {
        saved_id: names[id(param)]
        for saved, group in zip(state["param_groups"], groups, strict=True)
        for saved_id, param in zip(saved["params"], group["params"], strict=True)
    }
    return {
        "state": {name_of[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**saved, "params": [name_of[i] for i in saved["params"]]}
            for saved in state["param_groups"]
        ],
    }


def check_resumable(path: Path, sharded_run: bool) -> None:
    """A ``RunError`` (one line) when a sharded checkpoint is to be resumed without
    ``--strategy fsdp``: only a sharded run reads its shards back."""
    if is_sharded_checkpoint(path) and not sharded_run:
        raise RunError(
            f"--resume: {path} is a sharded checkpoint (a directory, written under --strategy "
            "fsdp); resume it with --strategy fsdp (any --devices), or start again without --resume"
        )


def read_meta(path: Path) -> dict:
    """A sharded checkpoint's ``meta.pt``: everything but the weights and optimizer state."""
    return read_checkpoint(Path(path) / META_NAME)


def missing_shards(path: Path) -> list[str]:
    """The shard files DCP's index names that are absent or shorter than it says (a torn
    write); raises ``OSError``/``ValueError`` when the index itself cannot be read."""
    metadata = FileSystemReader(str(path)).read_metadata()
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    return sorted(
        name
        for name, end in ends.items()
        if not (path / name).is_file() or (path / name).stat().st_size < end
    )


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint, read in this one process (no
    process group; as torch's ``format_utils.dcp_to_torch_save``, model keys only): for a
    check of its weights, not for training."""
    state: dict = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(str(path)),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    return state.get("state_dict", {})
