"""The files a parity case trains from, written once so both sides load exactly the same ones.

``prepare_workspace(case, workdir)`` writes, under ``workdir``:

- ``data.jsonl``: the generated rows (absent when the case names a ``dataset_path``);
- ``policy/``: the tiny policy and its tokenizer (absent with ``model_path``: the policy is that
  directory);
- ``reference/``: the reference, a seeded perturbation of the policy, with the tokenizer;
- ``adapter_init/``: the initial LoRA adapter (LoRA cases only);
- ``workspace.json``: the settings the files were made from. A second call with the same
  settings reuses the files, so ``run_trl`` and ``run_ours`` can each call it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_core.rows import write_jsonl
from parity.sides.cases import ParityCase
from parity.sides.datasets_io import generate_rows, load_preference_rows, tokenizer_corpus
from parity.sides.models import build_tiny_model, load_model, perturbed_copy, save_adapter_init
from training.embedded.tokenizer import train_tokenizer
from training.inputs.gguf import as_model_dir

MARKER = "workspace.json"
# The case fields the files depend on; the loss, optimizer and schedule do not change them.
WORKSPACE_FIELDS = (
    "arch",
    "model_path",
    "dataset_path",
    "data",
    "num_rows",
    "steps",
    "batch_size",
    "grad_accum",
    "seed",
    "vocab_size",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
)


@dataclass(frozen=True)
class Workspace:
    """Paths of one prepared case.

    Attributes:
        data_path: the preference file both sides train on.
        policy_dir: the initial policy, loadable with ``from_pretrained`` (tokenizer included).
        reference_dir: the reference model (tokenizer included).
        adapter_init_dir: the initial LoRA adapter, or None without LoRA.
    """

    data_path: pathlib.Path
    policy_dir: pathlib.Path
    reference_dir: pathlib.Path
    adapter_init_dir: pathlib.Path | None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer saved with the policy."""
        return AutoTokenizer.from_pretrained(str(self.policy_dir))


def workspace_paths(case: ParityCase, workdir: pathlib.Path) -> Workspace:
    """Where ``prepare_workspace`` puts (or put) the files of ``case``."""
    workdir = pathlib.Path(workdir)
    return Workspace(
        data_path=pathlib.Path(case.dataset_path) if case.dataset_path else workdir / "data.jsonl",
        # a .gguf checkpoint is converted once into a model directory (training.inputs.gguf)
        policy_dir=pathlib.Path(as_model_dir(case.model_path))
        if case.model_path
        else workdir / "policy",
        reference_dir=workdir / "reference",
        adapter_init_dir=workdir / "adapter_init" if case.lora else None,
    )


def prepare_workspace(case: ParityCase, workdir: pathlib.Path) -> Workspace:
    """Write (or reuse) the data, tokenizer, policy, reference and adapter of ``case``."""
    workdir = pathlib.Path(workdir)
    paths = workspace_paths(case, workdir)
    key = {name: getattr(case, name) for name in WORKSPACE_FIELDS}
    marker = workdir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return paths
    workdir.mkdir(parents=True, exist_ok=True)
    rows = _case_rows(case, paths)
    if case.model_path:
        tokenizer = AutoTokenizer.from_pretrained(paths.policy_dir)
        policy = load_model(paths.policy_dir, _full_precision(case))
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(rows), vocab_size=case.vocab_size)
        policy = build_tiny_model(case.arch, tokenizer, case.seed)
        _save(policy, tokenizer, paths.policy_dir)
    _save(perturbed_copy(policy, seed=case.seed + 1), tokenizer, paths.reference_dir)
    if paths.adapter_init_dir is not None:
        save_adapter_init(paths.policy_dir, case, paths.adapter_init_dir)
    marker.write_text(json.dumps(key, indent=1))
    return paths


def training_rows(case: ParityCase, ws: Workspace) -> list[dict]:
    """The rows both sides train on, in order: the first ``case.rows_needed`` of the data file.

    trl then drops rows whose prompt alone fills ``max_length`` (``keep_start``), and cycles
    through what is left when ``steps`` need more batches than one epoch holds.
    """
    return load_preference_rows(ws.data_path)[: case.rows_needed]


def _case_rows(case: ParityCase, paths: Workspace) -> list[dict]:
    """The case's rows: read from its file, or generated and written to ``data.jsonl``."""
    if case.dataset_path:
        return load_preference_rows(case.dataset_path)
    rows = generate_rows(case.data, case.rows_needed, case.seed)
    write_jsonl(rows, paths.data_path)
    return rows


def _full_precision(case: ParityCase) -> ParityCase:
    """The case loaded in float32: the reference is perturbed from unquantized weights."""
    return dataclasses.replace(case, load_in_4bit=False, lora=False)


def _save(model, tokenizer: PreTrainedTokenizerBase, directory: pathlib.Path) -> None:
    """Save model and tokenizer side by side, the pad id written into the config as trl does."""
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
