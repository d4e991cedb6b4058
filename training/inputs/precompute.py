"""Reference log-probs computed once before training and cached on disk.

The reference (a frozen copy of the starting policy, ``--ref-model``, or the LoRA model with its
adapters off) runs once over the train and held-out rows; the values ride along with each row
into the batches (``ref_chosen_logps`` / ``ref_rejected_logps``), so a training step needs no
reference forward. Each cache file is named by its key, a hash of the weights, tokenizer, tokens,
truncation, dtype, ld_alpha and precision (``dpo_core.reference_cache.reference_cache_key``): a run
with anything changed computes a new file, and a stale file is never read. A cache file that
cannot be used (torn, truncated, another format, another key under the same name) is recomputed
and replaced, with a note naming it; a failed write (a full disk) names the file and leaves no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dpo_core import reference as ref
from dpo_core import reference_cache as cache
from dpo_core.collate import PreferenceCollator
from training.base.errors import writing
from training.base.precision import AUTOCAST_DTYPES
from training.base.settings import dpo_settings
from training.inputs.data_module import features_fingerprint
from training.inputs.features import set_reference_logps
from training.inputs.model_loading import build_reference

log = logging.getLogger(__name__)


def pairs_read(cfg, total_steps: int) -> int:
    """Training pairs a run of ``total_steps`` optimizer steps reads, over all processes."""
    return total_steps * cfg.trainer.pairs_per_batch * cfg.trainer.gradient_accumulation_steps


def resolve_precompute(cfg, n_train: int, total_steps: int):
    """``cfg`` with ``precompute_ref_log_probs`` decided: as set, or when unset (None), on
    exactly when the run reads every one of the ``n_train`` rows at least once, so computing
    each row's reference log-probs up front costs no more reference forwards than a live
    reference would. Reference-free training never precomputes."""
    want = cfg.dpo.precompute_ref_log_probs
    if cfg.dpo.reference_free:
        want = False
    elif want is None:
        pairs = pairs_read(cfg, total_steps)
        want = pairs >= n_train
        log.info(
            "reference log-probs: %s (the run reads %d pairs of %d rows; set "
            "--precompute-ref-log-probs / --no-precompute-ref-log-probs to choose)",
            "precomputed once" if want else "computed live each step",
            pairs,
            n_train,
        )
    return dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, precompute_ref_log_probs=want))


def _precompute_device(cfg) -> torch.device:
    """The device to run the precomputation on: the run's GPU when it trains on one."""
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _live_reference(policy, cfg):
    """The reference to precompute with: what ``build_reference`` would use live."""
    live_cfg = dataclasses.replace(
        cfg, dpo=dataclasses.replace(cfg.dpo, precompute_ref_log_probs=False)
    )
    return build_reference(policy, live_cfg)


def _cached_logps(reference, features, collator, cfg, key_model, tokenizer, name):
    """(chosen (N,), rejected (N,)) for ``features`` (whose ``index`` is 0..N-1), from the cache
    file for this exact key, computing and writing it when absent."""
    settings = cache.CacheSettings(
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.truncation_mode,
        dtype=cfg.model.dtype,
        ld_alpha=cfg.dpo.ld_alpha,
        precision=cfg.trainer.precision,
    )
    key = cache.reference_cache_key(
        key_model,
        tokenizer=tokenizer,
        data_fingerprint=features_fingerprint(features),
        settings=settings,
    )
    path = Path(cfg.trainer.output_dir) / "reference_logps" / f"{name}-{key[:16]}.pt"
    cached = _read_cache(path, key, len(features), name)
    if cached is not None:
        return cached
    loader = DataLoader(features, batch_size=cfg.trainer.eval_batch_size, collate_fn=collator)
    with torch.no_grad(), _model_on(reference.model, _precompute_device(cfg)) as device:
        batches = (batch.to(device) for batch in loader)
        with _autocast(cfg.trainer.precision, device):
            chosen, rejected = ref.precompute_reference_logps(
                reference, batches, dpo_settings(cfg).reference_options(), num_rows=len(features)
            )
    with writing(path, "writing the reference log-prob cache"):
        cache.save_reference_cache(path, key, chosen, rejected, torch.arange(len(features)))
    log.info("reference log-probs (%s): computed for %d rows -> %s", name, len(features), path)
    return chosen, rejected


def _read_cache(path: Path, key: str, num_rows: int, name: str):
    """(chosen, rejected) from the cache file at ``path``, or None when there is none or it
    cannot be used (torn, truncated, another format or key, wrong rows): then it is recomputed
    and replaced, with a note naming the file and why."""
    if not path.exists():
        return None
    try:
        values = cache.load_reference_cache(path, key, num_rows)
    except (ValueError, OSError) as err:
        log.warning("reference log-probs (%s): %s; recomputing it", name, _first_line(err))
        return None
    log.info("reference log-probs (%s): cached in %s", name, path)
    return values


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _autocast(precision: str, device: torch.device):
    """The autocast region training runs its forwards in under Lightning's ``precision``
    (``bf16-mixed``, ``16-mixed``), so precomputed values equal live ones; else no autocast."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _model_on(model: torch.nn.Module, device: torch.device):
    """Hold ``model`` on ``device`` for the block, then move it back. 4-bit models stay where
    bitsandbytes placed them."""
    home = next(model.parameters()).device
    if device == home or getattr(model, "is_loaded_in_4bit", False):
        yield home
        return
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)


def attach_precomputed_reference(policy, inputs, cfg) -> ref.PrecomputedReference:
    """Compute (or load) the reference log-probs of every train and held-out row, store them in
    the rows' features, and return the source that reads them back from each batch."""
    reference = _live_reference(policy, cfg)
    key_model = getattr(reference, "model", policy)
    collator = PreferenceCollator(
        pad_token_id=inputs.tokenizer.pad_token_id,
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.truncation_mode,
    )
    for name, features in (("train", inputs.data.train), ("heldout", inputs.data.heldout)):
        if not features:
            continue
        chosen, rejected = _cached_logps(
            reference, features, collator, cfg, key_model, inputs.tokenizer, name
        )
        set_reference_logps(features, chosen.tolist(), rejected.tolist())
    del reference
    return ref.PrecomputedReference()
