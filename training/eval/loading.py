"""What an evaluation reads: the before / after / reference models and the run's config.

The three models follow the training run's own choices:

- **after**: the trained policy (in memory at the end of ``training.fit``, or ``--model-dir``: a
  full model, or a LoRA adapter, recognised by its ``adapter_config.json``, loaded with peft on
  the starting model);
- **before**: the starting policy, i.e. ``--model`` (with ``--adapter`` when the run started from
  one). Under LoRA it is the trained model with its adapters switched off: no second copy;
- **reference**: ``--ref-model`` when the run had one; under LoRA the adapters-off model (as in
  training); otherwise the starting model, so that before training policy = reference.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.base.cli import resolve_config
from training.base.config import FitConfig, check_config
from training.eval.scoring import ModelView
from training.inputs.model_loading import frozen, load_causal_lm


@dataclass
class EvalModels:
    """The three models an evaluation reads (views may share one model)."""

    before: ModelView
    after: ModelView
    reference: ModelView


def is_peft(model: nn.Module) -> bool:
    """A peft model (its adapters can be switched off)."""
    return callable(getattr(model, "disable_adapter", None))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def moved(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` (not moved when already there: 4-bit models refuse ``.to``)."""
    return model if device_of(model) == device else model.to(device)


def load_start_model(model_path: str, cfg: FitConfig) -> nn.Module:
    """The starting policy, frozen: ``model_path`` (4-bit if the run was), plus ``--adapter``."""
    model = load_causal_lm(model_path, cfg, quantize=cfg.lora.load_in_4bit)
    if cfg.model.adapter:
        # why: peft takes ~1.3 s to import (bitsandbytes with it); only adapter runs need it
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.model.adapter)
    return frozen(model)


def build_models(
    trained: nn.Module, cfg: FitConfig, model_path: str, *, live_copy: nn.Module | None = None
) -> EvalModels:
    """The three views (module docstring). ``live_copy``: a frozen model that training already
    holds as its reference (the copy of the starting model, or ``--ref-model``), reused."""
    device = device_of(trained)
    after = ModelView(trained)
    if live_copy is trained:
        live_copy = None
    reference = None
    if cfg.model.ref_model:
        quantize = cfg.lora.load_in_4bit
        ref = live_copy or frozen(load_causal_lm(cfg.model.ref_model, cfg, quantize=quantize))
        ref = moved(ref, device)
        reference = ModelView(ref)
        live_copy = None  # it is the --ref-model, not the starting model
    elif is_peft(trained):
        reference = ModelView(trained, adapters_off=True)
    if is_peft(trained) and not cfg.model.adapter:
        before = ModelView(trained, adapters_off=True)
    elif live_copy is not None and not cfg.model.adapter:
        before = ModelView(live_copy)
    else:
        before = ModelView(moved(load_start_model(model_path, cfg), device))
    return EvalModels(before=before, after=after, reference=reference or before)


def load_trained(model_dir: Path, model_path: str, cfg: FitConfig, device: torch.device):
    """``model_dir`` as saved by ``training.fit``: a full model, or an adapter on ``model_path``."""
    if (model_dir / "adapter_config.json").is_file():
        # why: peft takes ~1.3 s to import (bitsandbytes with it); only adapter runs need it
        from peft import PeftModel

        base = load_causal_lm(model_path, cfg, quantize=cfg.lora.load_in_4bit)
        return moved(frozen(PeftModel.from_pretrained(base, model_dir)), device)
    return moved(frozen(load_causal_lm(str(model_dir), cfg)), device)


def adapter_base(model_dir: Path) -> str | None:
    """The base model an adapter directory names (``base_model_name_or_path``), if any."""
    config = model_dir / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def pick_device(accelerator: str) -> torch.device:
    """``cpu``, ``gpu``/``cuda`` or ``auto`` (a GPU when there is one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def eval_config(args: argparse.Namespace, eval_fields: dict) -> FitConfig:
    """The run's saved ``config.yaml`` beside ``--model-dir``, with the command line's model,
    data and evaluation settings on top. Without that file the command line must name the
    starting model (``--reference``, or an adapter's base) and the data: a ``ValueError``
    naming the missing file otherwise, never a quiet evaluation against the embedded default."""
    saved = args.model_dir.parent / "config.yaml"
    if saved.is_file():
        try:
            cfg = resolve_config(["--config", str(saved)])[0]
        except ValueError as err:  # a value out of range names its field, not the file
            raise ValueError(err if str(saved) in str(err) else f"{saved}: {err}") from None
    else:
        cfg = FitConfig()
        cfg.model.model = args.reference or adapter_base(args.model_dir)
        if not cfg.model.model or not (args.dataset or args.eval_file):
            raise ValueError(
                f"{saved}: no such file (the run's config, which names the starting model and "
                "the data); give --reference and --dataset or --eval-file to evaluate without it"
            )
    if args.reference:
        cfg.model.model, cfg.model.ref_model, cfg.model.adapter = args.reference, None, None
    if args.dataset or args.eval_file:
        cfg.data.dataset = args.dataset or args.eval_file
        cfg.data.eval_dataset = args.eval_file
    for name in ("eval_split", "eval_fraction", "max_length"):
        if getattr(args, name) is not None:
            setattr(cfg.data, name, getattr(args, name))
    if hasattr(args, "eval_max_pairs"):  # given (None: no cap)
        cfg.data.eval_max_pairs = args.eval_max_pairs
    if args.beta is not None:
        cfg.dpo.beta = args.beta
    if args.seed is not None:
        cfg.trainer.seed = args.seed
    if args.accelerator is not None:
        cfg.trainer.accelerator = args.accelerator
    for name, value in eval_fields.items():
        setattr(cfg.eval, name, value)
    check_config(cfg)
    return cfg
