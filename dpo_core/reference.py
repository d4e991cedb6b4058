"""Where the reference log-probs ``log π_ref(y | x)`` come from: interchangeable sources.

DPO's implicit reward is ``β (log π_θ(y|x) - log π_ref(y|x))`` (Rafailov et al. 2023, Eq. 5);
π_ref must stay fixed while π_θ trains. Every source is ``source(batch, options) ->
SequenceLogps``, the same type the policy's forward gives, computed as trl does (dpo:1318-1347).
A source has no options of its own: ``options`` (``LogpOptions``, from the run's settings) says how
the log-probs are computed, so the reference is scored exactly as the policy is.

- ``FrozenCopyReference``: a separate copy of the model, eval mode, no gradients.
- ``AdapterDisabledReference``: the policy's own ``PeftModel`` inside ``disable_adapter()``; the
  base weights under a LoRA never change, so switching the adapters off gives the reference
  (trl dpo:1328-1336 via ``use_adapter(model, None)``).
- ``PrecomputedReference``: values computed once before training (``precompute_reference_logps``),
  read from the batch or looked up by row index; a batch without them is an error, never a
  silent fallback (in trl #1962 ignored precomputed values left the loss stuck at log 2).
- ``NoReference``: ``log π_ref = 0`` for every completion: reference-free training.

The on-disk cache of precomputed values is keyed by everything that determines them
(``reference_cache_key``) and a stale or mismatched cache is refused, never used.

``dpo:N`` are lines of trl 1.16.0's trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions, SequenceLogps
from dpo_core.logps import sequence_logps

CACHE_FORMAT = "dpo-reference-logps-v1"


class ReferenceSource(ABC):
    """``source(batch, options) -> SequenceLogps`` of the reference, float32, no grad."""

    name: str

    @abstractmethod
    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps: ...


class _ModelReference(ReferenceSource):
    """A reference that is a model: its log-probs through the policy's own path, without grad,
    inside ``_view()`` (the adapters switched off, for ``AdapterDisabledReference``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _view(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        with torch.no_grad(), self._view():
            return sequence_logps(self.model, batch, options)


class FrozenCopyReference(_ModelReference):
    """A separate reference model: put in eval mode with ``requires_grad=False`` on construction.

    Pass ``policy`` to have ``check_reference_is_not_policy`` refuse a reference that is, or
    shares weights with, the policy.
    """

    name = "frozen_copy"

    def __init__(self, ref_model: nn.Module, *, policy: nn.Module | None = None) -> None:
        if policy is not None:
            check_reference_is_not_policy(policy, ref_model)
        super().__init__(ref_model.eval().requires_grad_(False))


class AdapterDisabledReference(_ModelReference):
    """The policy ``PeftModel`` itself with every adapter switched off (``disable_adapter()``).

    The model keeps its train/eval mode, as in trl, so the base layers take the same code path as
    in the policy forward (dropout is disabled in both, trl's ``disable_dropout=True``).
    """

    name = "adapters_disabled"

    def __init__(self, peft_model: nn.Module) -> None:
        if not callable(getattr(peft_model, "disable_adapter", None)):
            raise TypeError(
                f"AdapterDisabledReference needs a peft PeftModel (with disable_adapter()), "
                f"got {type(peft_model).__name__}; use FrozenCopyReference for a full model."
            )
        super().__init__(peft_model)

    def _view(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter()


class NoReference(ReferenceSource):
    """Reference-free training: ``log π_ref = 0``, so the reward is ``β log π_θ``."""

    name = "none"

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        return SequenceLogps.zeros(batch.num_pairs, batch.input_ids.device)


class PrecomputedReference(ReferenceSource):
    """Reference log-probs computed before training.

    Without tables, reads ``batch.ref_chosen_logps`` / ``batch.ref_rejected_logps``. With
    ``chosen`` / ``rejected`` tables (N,) (from ``load_reference_cache``), looks rows up by
    ``batch.index``. A batch without them is an error: a silent fallback (0, or the policy
    itself) would train against the wrong reference (trl #1962). ``options`` were fixed when the
    values were computed (the cache key holds ``ld_alpha``).
    """

    name = "precomputed"

    def __init__(self, chosen: torch.Tensor | None = None, rejected: torch.Tensor | None = None):
        if (chosen is None) != (rejected is None):
            raise ValueError(
                "PrecomputedReference: give both chosen and rejected tables, or neither"
            )
        if chosen is not None and (chosen.dim() != 1 or chosen.shape != rejected.shape):
            raise ValueError(
                f"PrecomputedReference: tables must both be (N,), got {tuple(chosen.shape)} "
                f"and {tuple(rejected.shape)}"
            )
        self.chosen, self.rejected = chosen, rejected

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        if self.chosen is not None:
            return SequenceLogps(*self._lookup(batch))
        missing = [
            f for f in ("ref_chosen_logps", "ref_rejected_logps") if getattr(batch, f) is None
        ]
        if missing:
            raise ValueError(
                f"PrecomputedReference: the batch has no {' / '.join(missing)}; precompute them "
                "(precompute_reference_logps + save/load_reference_cache) or use a live reference. "
                "A silent fallback (0, or the policy itself) trains against the wrong reference "
                "(trl #1962: loss stuck at log 2)."
            )
        expected = (batch.num_pairs,)
        for f in ("ref_chosen_logps", "ref_rejected_logps"):
            if tuple(getattr(batch, f).shape) != expected:
                shape = tuple(getattr(batch, f).shape)
                raise ValueError(
                    f"PrecomputedReference: batch.{f} has shape {shape}, need {expected}"
                )
        return SequenceLogps(batch.ref_chosen_logps, batch.ref_rejected_logps)

    def _lookup(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.index is None:
            raise ValueError("PrecomputedReference: the batch has no index to look its rows up by")
        index = batch.index.to(self.chosen.device)
        bad = index[(index < 0) | (index >= self.chosen.shape[0])]
        if bad.numel():
            raise ValueError(
                f"PrecomputedReference: batch.index holds rows {bad.tolist()} outside the "
                f"{self.chosen.shape[0]} precomputed rows"
            )
        device = batch.input_ids.device
        return self.chosen[index].to(device), self.rejected[index].to(device)


def check_reference_is_not_policy(policy: nn.Module, reference_model: nn.Module) -> None:
    """Raise ValueError if ``reference_model`` is ``policy`` or shares parameter storage with it.

    A reference that moves with the policy gives ``log π_θ - log π_ref = 0`` for both halves of
    every pair: the loss reads log 2 and the rewards 0 at every step while the gradient pushes
    ``log π_θ(chosen) - log π_θ(rejected)`` apart with no KL anchor (trl #1148, #1962).
    """
    consequence = (
        "A reference that moves with the policy keeps the DPO loss at log 2 ≈ 0.6931 and the "
        "rewards at 0 at every step, with no KL anchor (trl #1148, #1962). Pass a copy made "
        "before training (copy.deepcopy), AdapterDisabledReference for a peft model, or "
        "precomputed reference log-probs."
    )
    if reference_model is policy:
        raise ValueError(f"the reference model is the policy object itself. {consequence}")

    def storage(p: torch.Tensor) -> tuple[torch.device, int]:
        return p.device, p.untyped_storage().data_ptr()

    policy_storage = {storage(p): name for name, p in policy.named_parameters()}
    for name, p in reference_model.named_parameters():
        shared_with = policy_storage.get(storage(p))
        if shared_with is not None and storage(p)[1] != 0:  # 0: meta / empty, nothing shared
            raise ValueError(
                f"the reference parameter {name!r} shares its storage with the policy "
                f"parameter {shared_with!r}. {consequence}"
            )


# ------------------------------------------------------------------ precomputation and disk cache


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


def _tokenizer_identity(tokenizer) -> str:
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
    h.update(_tokenizer_identity(tokenizer).encode())
    _update_with_weights(h, model)
    return h.hexdigest()


def _check_rows_once(index: torch.Tensor, num_rows: int, source: str) -> None:
    """Raise ValueError unless ``index`` holds every row 0..num_rows-1 exactly once."""
    outside = index[(index < 0) | (index >= num_rows)]
    if outside.numel():
        raise ValueError(f"{source}: rows {outside[:10].tolist()} lie outside 0..{num_rows - 1}")
    counts = torch.bincount(index, minlength=num_rows)
    repeated = (counts > 1).nonzero().flatten()
    missing = (counts == 0).nonzero().flatten()
    if repeated.numel() or missing.numel():
        raise ValueError(
            f"{source}: expected rows 0..{num_rows - 1} once each; repeated rows "
            f"{repeated[:10].tolist()}, missing rows {missing[:10].tolist()} "
            f"({missing.numel()} missing)"
        )


def precompute_reference_logps(
    reference: ReferenceSource,
    batches: Iterable[PreferenceBatch],
    options: LogpOptions,
    *,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``reference`` over every batch once: (chosen (N,), rejected (N,)) float32 on CPU,
    position i holding data-set row i (from ``batch.index``). Every row must appear exactly once;
    ``num_rows`` defaults to ``max(index) + 1``. trl does this at init (dpo:1168-1283).
    ``options``: as training scores the reference (``DPOSettings.reference_options``).
    """
    chosen, rejected, index = [], [], []
    for i, batch in enumerate(batches):
        if batch.index is None:
            raise ValueError(f"precompute_reference_logps: batch {i} has no index (row numbers)")
        c, r = reference(batch, options).detached()
        chosen.append(c)
        rejected.append(r)
        index.append(batch.index.cpu().long())
    if not index:
        raise ValueError("precompute_reference_logps: no batches")
    index = torch.cat(index)
    num_rows = int(index.max()) + 1 if num_rows is None else num_rows
    _check_rows_once(index, num_rows, "precompute_reference_logps")
    order = torch.argsort(index)
    return torch.cat(chosen)[order], torch.cat(rejected)[order]


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
    _check_rows_once(index, expected_num_rows, f"reference cache {path}")
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise ValueError(f"reference cache {path} holds non-finite log-probs")
    order = torch.argsort(index)
    return chosen[order], rejected[order]
