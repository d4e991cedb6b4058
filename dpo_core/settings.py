"""The DPO objective's settings, declared once: ``LossSettings``.

Each field has trl 1.16's ``DPOConfig`` name and default and a one-line description in its
``metadata["help"]``. The losses read it (``dpo_core.losses.combined_dpo_loss``), one step holds it
(``dpo_core.step.DPOSettings``), training's config extends it, so every field is a command-line
flag (``training.base.config.DPOConfig``), and a parity case holds one (``parity.sides.cases``), which
trl's side passes on unchanged: the names are trl's.

Example: ``LossSettings(beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])``;
one loss may be given as a name, as trl takes it: ``LossSettings(loss_type="ipo")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpo_core.loss_checks import check_loss_settings


def _setting(default, help: str):  # noqa: A002 - "help" is what the command line shows
    """A dataclass field with its single default and its one-line description."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LossSettings:
    """Which losses, and every knob that changes the loss value (trl's names and defaults).

    ``use_weighting`` and ``ld_alpha`` act on the inputs of the loss (``dpo_core.step``: WPO pair
    weights, LD-weighted sums); the others are read by ``dpo_core.losses``. Construction checks
    each field on its own (``check_loss_settings``); combinations trl rejects (``exo_pair`` with
    no smoothing, an f-divergence with a loss that has none) are errors of the loss call, so a
    parity case can hold them and report that trl cannot run them.
    """

    beta: float = _setting(0.1, "KL strength: the implicit reward is beta * log(pi / pi_ref).")
    loss_type: list[str] = _setting(["sigmoid"], "One or more of dpo_core.losses.LOSS_TYPES.")
    loss_weights: list[float] | None = _setting(None, "One weight per loss_type; unset = all 1.0.")
    label_smoothing: float = _setting(0.0, "cDPO/robust/exo/aot label noise epsilon.")
    f_divergence_type: str = _setting(
        "reverse_kl", "reverse_kl, forward_kl, js_divergence, alpha_divergence."
    )
    f_alpha_divergence_coef: float = _setting(0.5, "alpha for alpha_divergence.")
    use_weighting: bool = _setting(False, "WPO: weight pairs by their policy likelihood.")
    ld_alpha: float | None = _setting(
        None, "LD-DPO: weight of completion tokens past the shared length."
    )
    discopop_tau: float = _setting(0.05, "Temperature of the discopop loss.")
    reference_free: bool = _setting(False, "Take reference log-probs as 0 (no reference model).")
    router_aux_loss_coef: float | None = _setting(
        None, "MoE: weight of the router's load-balancing loss (None: the model config's)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):  # trl's DPOConfig wraps one name in a list
            self.loss_type = [self.loss_type]
        if isinstance(self.loss_weights, int | float):
            self.loss_weights = [float(self.loss_weights)]
        check_loss_settings(self, self.option_name)

    def option_name(self, field_name: str) -> str:
        """How errors name a field: as declared here (training's config names its flag)."""
        return field_name

    @property
    def weights(self) -> list[float]:
        """One weight per entry of ``loss_type``: ``loss_weights``, or 1.0 each."""
        if self.loss_weights is None:
            return [1.0] * len(self.loss_type)
        return list(self.loss_weights)
