"""The own-logits guard on the run's models, when they are loaded (``dpo_core.model_checks``).

Before any step, the policy and a live reference (a frozen copy, or the policy with its adapters
switched off) each score a probe through our path, and the log-probs must equal a float64
log-softmax of the model's own logits: a model whose logit transform we would not reproduce, or
whose parts we would not find, stops the run here with one line instead of training on wrong
numbers. A precomputed reference is computed by the policy's path (checked) and a reference-free
run has none. Each model's finding is logged as one line, and so is whether packed rows run for
this model (``dpo_core.packing.model_blocker``, proven on the same probe). A router loss weight given for a model
without a router is refused too (it would be ignored).
"""

from __future__ import annotations

import logging

from torch import nn

from dpo_core.logit_transforms import UnknownLogitTransform
from dpo_core.model_checks import OwnLogitsCheck, own_logits_check
from dpo_core.packing import model_blocker
from dpo_core.reference import ReferenceSource
from dpo_core.router_aux import check_router_setting
from training.base.config import FitConfig
from training.base.errors import RunError
from training.base.settings import dpo_settings

log = logging.getLogger("training.fit")


def check_run_models(policy: nn.Module, reference: ReferenceSource | None, cfg: FitConfig):
    """Run the guard on the policy and a live reference; raise ``RunError`` on a mismatch.
    Returns the findings (policy first)."""
    settings = dpo_settings(cfg)
    try:
        check_router_setting(policy, cfg.dpo.router_aux_loss_coef)
    except ValueError as err:
        raise RunError(f"--router-aux-loss-coef: {err}") from err
    checks = [("policy", lambda: own_logits_check(policy, settings.policy_options()))]
    if callable(getattr(reference, "own_logits_check", None)):
        checks.append(
            ("reference", lambda: reference.own_logits_check(settings.reference_options()))
        )
    findings = []
    for role, run in checks:
        finding = _checked(role, run)
        log.info(finding.line(role))
        findings.append(finding)
    if cfg.dpo.prompt_sharing:  # decided now, on the whole model, not in a (sharded) step
        reason = model_blocker(policy)
        log.info("fast path (prompt sharing, padding-free): " + (reason or "on"))
    return findings


def _checked(role: str, run) -> OwnLogitsCheck:
    try:
        finding = run()
    except UnknownLogitTransform as err:
        raise RunError(f"{role} model refused: {err}") from err
    if not finding.passed:
        raise RunError(
            f"{finding.line(role)}; the run stops rather than train on log-probs that are not the "
            "model's own"
        )
    return finding
