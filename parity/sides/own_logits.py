"""The model's own logits as the oracle of step 1's log-probs, independent of both sides.

trl's step-1 ``logps/chosen`` and ``logps/rejected`` are means over the step's pairs of the
policy's summed completion log-probs, and ``rewards/*`` add the reference's
(``ρ̄ = logps - rewards / beta``). Parity compares ours with trl; if both share a mistake (trl
scores with the backbone and the bare LM head, and misses a logit transform a family applies in
its own ``forward``: ModernBERT-decoder's prediction head, RecurrentGemma's ``logits_soft_cap``),
they agree and the comparison proves nothing. So this module computes the same means from the
model itself, in the plainest way there is, sharing no code with trl or with ``dpo_core``'s head:

    logits = model(input_ids, attention_mask).logits       # float32, the model's own forward
    logp   = log_softmax(logits.double())[t, ids[t + 1]]    # float64
    sum_i  = Σ_t completion_mask[i, t + 1] · logp_i[t]     # float64

on the step-1 micro-batches (the first ``batch_size`` x ``grad_accum`` rows, collated as both
sides collate them: ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``, right-padded),
for the initial policy (with its initial LoRA adapter) and the reference, each read from the
case's files. The step's value is the mean over micro-batches of their means over pairs, as
trl logs it.

The bound is what a correct float32 computation of the same sums can be off by, per sequence,
then averaged like the values (``sequence_bound``): each completion token's log-prob
``z_y - logsumexp(z)`` is ``TOKEN_ROUNDINGS`` float32 roundings at the size of its operands
(``|z_y| + |logsumexp z|``: one of log Z, one of the subtraction; a side that recomputes the
logits in another blocking, as trl's fused head does, moves ``z`` by about one rounding of its
size, which the ``|z_y|`` term and log Z's already hold), and the sum of n of them adds at most
``ceil(log2 n)`` roundings of ``Σ|logp|`` (cascade summation, Higham §4.2).

Measured (2 steps' tiny models, batch 2, 64 tokens): correct sides (trl on llama, cohere2,
gemma2, qwen2_moe) at most 0.13 of the bound; trl on RecurrentGemma, which misses the model's
``logits_soft_cap`` (tiny random logits: a small effect), 1.9x to 11.7x; on ModernBERT-decoder,
scored without the model's prediction head, ~1000x to 8000x.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import torch

from dpo_core.collate import PreferenceCollator
from parity.sides.cases import ParityCase

EPS32 = torch.finfo(torch.float32).eps
TOKEN_ROUNDINGS = 2
# The four step-1 means: policy logps (trl's own names) and the reference's, derived from rewards.
QUANTITIES = ("logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


@dataclass
class OwnLogits:
    """The oracle's step-1 means (``QUANTITIES``) and the float32 bound of each.

    Attributes:
        values: quantity -> the mean over the step's pairs, from the model's own logits.
        bounds: quantity -> how far a correct float32 computation of it may be off.
        skipped: why there is no oracle for this case (then both dicts are empty).
    """

    values: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    skipped: str = ""


def not_measurable(case: ParityCase) -> str:
    """Why the oracle does not apply to ``case``, or ``""``."""
    if case.loss.ld_alpha is not None:
        return "ld_alpha: the logged log-probs are LD-weighted sums"
    if case.precision != "32-true":
        return f"{case.precision}: the sides' forward runs under autocast, not float32"
    return ""


def sequence_sums(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed completion log-probs of ``batch`` from ``model``'s own logits, float64
    ``log_softmax``, and the (2B,) float32 bound of each (module docstring)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    z = logits[:, :-1].double()  # (2B, L-1, V): position t predicts token t + 1
    log_z = z.logsumexp(dim=-1)
    labels = batch.input_ids[:, 1:].unsqueeze(-1)
    z_label = z.gather(-1, labels).squeeze(-1)
    logp = z_label - log_z  # the float64 log_softmax at the label
    mask = batch.completion_mask[:, 1:].double()
    sums = (logp * mask).sum(-1)
    return sums, sequence_bound(z_label, log_z, logp, mask)


def sequence_bound(
    z_label: torch.Tensor, log_z: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(2B,) how far a float32 sum of the masked per-token log-probs may be off (module
    docstring): ``eps * (TOKEN_ROUNDINGS * Σ(|z_y| + |log Z|) + ceil(log2 n) * Σ|logp|)``."""
    n = mask.sum(-1).clamp_min(2.0)
    tokens = TOKEN_ROUNDINGS * ((z_label.abs() + log_z.abs()) * mask).sum(-1)
    summation = torch.ceil(torch.log2(n)) * (logp.abs() * mask).sum(-1)
    return EPS32 * (tokens + summation)


def step_batches(case: ParityCase, token_ids: list[dict], pad_token_id: int) -> list:
    """The step-1 micro-batches: the first ``grad_accum`` groups of ``batch_size`` rows of
    ``token_ids`` (rows as the sides tokenized them), collated as both sides collate them."""
    collate = PreferenceCollator(
        pad_token_id=pad_token_id, max_length=case.max_length, truncation_mode=case.truncation_mode
    )
    size = case.batch_size
    starts = range(0, min(len(token_ids), size * case.grad_accum), size)
    return [collate(token_ids[s : s + size]) for s in starts]


def step_means(model: torch.nn.Module, batches: list) -> dict[str, tuple[float, float]]:
    """``chosen`` and ``rejected``: (mean over micro-batches of the mean over pairs, the same
    mean of the bounds)."""
    out = {"chosen": [], "rejected": []}
    for batch in batches:
        sums, bounds = sequence_sums(model, batch)
        half = batch.num_pairs
        out["chosen"].append((sums[:half].mean(), bounds[:half].mean()))
        out["rejected"].append((sums[half:].mean(), bounds[half:].mean()))
    return {
        k: (float(sum(v for v, _ in vs)) / len(vs), float(sum(b for _, b in vs)) / len(vs))
        for k, vs in out.items()
    }


def _initial_model(path: pathlib.Path, case: ParityCase, adapter_dir: pathlib.Path | None):
    """A side's starting model from the case's files: the directory, with the initial adapter."""
    # why here: peft and the model loader are seconds to import; the report's rows are not
    from peft import PeftModel

    from parity.sides.models import load_model

    model = load_model(path, case)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def measure(case: ParityCase, workdir: pathlib.Path, token_ids: list[dict]) -> OwnLogits:
    """The oracle of ``case``'s step 1 from the files under ``workdir`` and the rows'
    ``token_ids`` (``RunResult.token_ids``, either side's: they are checked equal)."""
    from parity.sides.workspace import prepare_workspace  # see _initial_model

    why = not_measurable(case)
    if why:
        return OwnLogits(skipped=why)
    ws = prepare_workspace(case, pathlib.Path(workdir))
    batches = step_batches(case, token_ids, ws.tokenizer().pad_token_id)
    if not batches:
        return OwnLogits(skipped="no rows")
    policy = _initial_model(ws.policy_dir, case, ws.adapter_init_dir)
    reference = _initial_model(ws.reference_dir, case, None)
    found = OwnLogits()
    for prefix, model in (("", policy), ("ref_", reference)):
        for half, (value, bound) in step_means(model, batches).items():
            found.values[f"{prefix}logps/{half}"] = value
            found.bounds[f"{prefix}logps/{half}"] = bound
    return found


def logged_means(step: dict[str, float], beta: float) -> dict[str, float]:
    """A side's step-1 values of ``QUANTITIES`` from its logged metrics: the policy's as
    logged, the reference's as ``logps - rewards / beta`` (every reward is ``beta * (π - ρ)``)."""
    out = {}
    for half in ("chosen", "rejected"):
        out[f"logps/{half}"] = step[f"logps/{half}"]
        out[f"ref_logps/{half}"] = step[f"logps/{half}"] - step[f"rewards/{half}"] / beta
    return out


def derivation_slack(step: dict[str, float], beta: float) -> float:
    """What deriving the reference's mean from float32 ``logps`` and ``rewards`` may add: one
    rounding of each (``rewards / beta`` carries the reward's rounding, ``eps * |reward| /
    beta``)."""
    terms = [
        abs(step[f"logps/{h}"]) + abs(step[f"rewards/{h}"]) / beta for h in ("chosen", "rejected")
    ]
    return EPS32 * max(terms) if not math.isnan(max(terms)) else 0.0
