"""What one side of a parity case hands back: per-step metrics, token ids and final weights.

Both sides (trl in ``parity.sides.trl_side``, ours in ``parity.sides.ours_side``) return a
``RunResult`` with the same names, so ``parity.check.compare`` can line them up without knowing who
produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpo_core.metrics import PAIR_METRICS, TOKEN_METRICS
from parity.sides.padding_free_check import PaddingFreeCheck

# The per-step metrics trl's DPOTrainer logs (trl/trainer/dpo_trainer.py:1535-1601; our names for
# them are dpo_core.metrics') plus the ones transformers.Trainer adds (loss, grad_norm,
# learning_rate). Their names are the contract.
STEP_METRICS = ("loss", "grad_norm", "learning_rate", *PAIR_METRICS, *TOKEN_METRICS, "num_tokens")

TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class RunResult:
    """One training run of a parity case.

    Attributes:
        steps: one dict per optimizer step (``steps[0]`` is step 1), keyed by trl's metric names
            (``STEP_METRICS``), full-precision Python floats.
        token_ids: one dict per kept training row, in data order, with ``prompt_ids``,
            ``chosen_ids`` and ``rejected_ids`` (lists of ints, before collation and truncation).
        final_weights: the trainable parameters after the last step, on CPU. Full fine-tuning:
            the plain Hugging Face parameter names (``model.layers.0.mlp.up_proj.weight``). LoRA:
            the adapter weights named as ``peft.get_peft_model_state_dict`` names them.
        dropped_rows: rows removed before training (trl drops rows whose prompt alone fills
            ``max_length`` under ``keep_start``).
        packed_4bit_layers: 4-bit layers of the policy or reference found, after training, in
            bitsandbytes' CPU inference layout, where they have no gradient
            (``training.inputs.four_bit``); empty for a correct run.
        padding_free: ours only: the padding-free forward against the plain one and a float64
            forward (``parity.sides.padding_free_check``), or None (trl's side).
    """

    steps: list[dict[str, float]]
    token_ids: list[dict[str, list[int]]]
    final_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped_rows: int = 0
    packed_4bit_layers: list[str] = field(default_factory=list)
    padding_free: PaddingFreeCheck | None = None

    def metric(self, name: str) -> list[float]:
        """The values of one metric over steps; ``KeyError`` naming the step when one lacks it."""
        values = []
        for i, step in enumerate(self.steps, start=1):
            if name not in step:
                raise KeyError(f"metric {name!r} missing at step {i}")
            values.append(step[name])
        return values
