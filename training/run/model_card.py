"""The model card (``README.md``) in ``model/`` and ``model-merged/``, as the hub reads one.

Written when the model is saved (base model, data, DPO settings, steps, final training metrics,
how to load it) and again after the evaluation with the before/after table. It replaces peft's
blank adapter template. The base model is named by its hub id or its directory's name, never an
absolute local path; so is the data.
"""

from __future__ import annotations

from pathlib import Path

from training.base.config import FitConfig
from training.base.errors import replaced_atomically, writing
from training.base.step_count import step_of
from training.eval.report import markdown_table
from training.run.metrics_csv import read_rows

# The final training metrics a card shows (trl's names), in this order.
CARD_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


def public_name(source: str | None) -> str | None:
    """A model or data source as a card may name it: a local path by its last part (a hub id
    has no local path and is kept)."""
    if not source:
        return None
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source


def _front_matter(cfg: FitConfig, adapter: bool) -> list[str]:
    base = public_name(cfg.model.model)
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {'peft' if adapter else 'transformers'}")
    lines += ["pipeline_tag: text-generation", "tags:", "- dpo", "- lightning", "---", ""]
    return lines


def _settings(cfg: FitConfig) -> list[str]:
    """The DPO settings, under trl's names."""
    t, o, d = cfg.trainer, cfg.optim, cfg.dpo
    rows = [
        ("loss_type", " + ".join(d.loss_type)),
        ("loss_weights", d.loss_weights),
        ("beta", d.beta),
        ("learning_rate", o.learning_rate),
        ("lr_scheduler_type", o.lr_scheduler_type),
        ("warmup_steps", o.warmup_steps),
        ("per_device_train_batch_size", t.batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("devices x nodes", t.world_size),
        ("max_length", cfg.data.max_length),
        ("precision", t.precision),
        ("seed", t.seed),
    ]
    if cfg.lora.lora:
        rows += [("lora_r", cfg.lora.lora_r), ("lora_alpha", cfg.lora.lora_alpha)]
        rows += [("load_in_4bit", cfg.lora.load_in_4bit)]
    lines = ["| setting | value |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows if value is not None]


def _training(out: Path) -> list[str]:
    """Steps trained and the last step's metrics, from metrics.csv."""
    steps = [r for r in read_rows(out / "metrics.csv") if r.get("loss")]
    if not steps:
        return ["No step was logged."]
    last = steps[-1]
    lines = [f"{step_of(last)} optimizer steps. The last step's metrics:", ""]  # trl's count
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {float(last[k]):.4f} |" for k in CARD_METRICS if last.get(k)]
    return lines


def _how_to_load(adapter: bool, merged: bool, base: str) -> list[str]:
    """The card's loading snippet. An adapter's ``adapter_config.json`` keeps peft's
    ``base_model_name_or_path`` (where this run loaded the base, a local path if it was one:
    peft reads it to load), so the card also shows loading onto a base from elsewhere."""
    tokenizer = 'tokenizer = AutoTokenizer.from_pretrained("path/to/model")'
    if not adapter or merged:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/model")',
        ]
        return ["```python", *load, tokenizer, "```"]
    return [
        "```python",
        "from peft import AutoPeftModelForCausalLM, PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# base + adapter, the base from adapter_config.json's base_model_name_or_path",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/model")',
        tokenizer,
        "```",
        "",
        "`adapter_config.json` names the base as this run loaded it (`base_model_name_or_path`, "
        "peft's field; a local directory when the run used one). With the base elsewhere (a "
        f"local copy of {base}, or its hub id), load the base first and the adapter onto it:",
        "",
        "```python",
        'base = AutoModelForCausalLM.from_pretrained("path/to/base")',
        'model = PeftModel.from_pretrained(base, "path/to/model")',
        "```",
    ]


def model_card(
    cfg: FitConfig, inputs, adapter: bool, merged: bool, evaluation: dict | None = None
) -> str:
    """The card's markdown. ``inputs``: the run's ``RunInputs`` (pair counts);
    ``evaluation``: eval.json's content, for the before/after table."""
    out = Path(cfg.trainer.output_dir)
    base = public_name(cfg.model.model) or "the embedded default model (training.embedded)"
    data = public_name(cfg.data.dataset) or "the embedded default's preference task"
    what = "a LoRA adapter for" if adapter and not merged else "a fine-tune of"
    if adapter and merged:
        what = "a fine-tune (LoRA adapter merged into the weights) of"
    lines = [*_front_matter(cfg, adapter and not merged), f"# {out.resolve().name}", ""]
    lines += [
        f"This is {what} **{base}**, trained with DPO (Direct Preference Optimization) by "
        "`python -m training.fit` (PyTorch Lightning; losses and metrics as trl's DPOTrainer).",
        "",
        "## Data",
        "",
        f"- source: {data} (split `{cfg.data.split}`)",
        f"- training pairs: {len(inputs.data.train)}; held-out pairs: {len(inputs.data.heldout)}",
        "",
        "## DPO settings",
        "",
        *_settings(cfg),
        "",
        "## Training",
        "",
        *_training(out),
        "",
    ]
    if evaluation:
        lines += ["## Before vs after (held-out)", "", *markdown_table(evaluation), ""]
    lines += ["## How to load", "", *_how_to_load(adapter, merged, f"**{base}**"), ""]
    return "\n".join(lines)


def write_model_cards(cfg: FitConfig, inputs, evaluation: dict | None = None) -> list[Path]:
    """Write ``README.md`` into ``model/`` and, when it exists, ``model-merged/``."""
    out = Path(cfg.trainer.output_dir)
    written = []
    for name, merged in (("model", False), ("model-merged", True)):
        folder = out / name
        if not folder.is_dir():
            continue
        path = folder / "README.md"
        text = model_card(cfg, inputs, cfg.lora.lora, merged, evaluation)
        with writing(path, "writing the model card"), replaced_atomically(path) as tmp:
            tmp.write_text(text)
        written.append(path)
    return written
