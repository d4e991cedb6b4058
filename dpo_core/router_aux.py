"""The router's load-balancing loss of a mixture-of-experts model, as trl adds it to DPO's.

A MoE layer routes each token to its top-k of E experts by ``softmax(router logits)``. Switch
Transformer's auxiliary loss (Fedus et al. 2021, Eqs. 4-6), summed over layers as transformers'
``load_balancing_loss_func`` does, keeps the experts evenly used::

    f_e = Σ_{layers, tokens} w_t · [e ∈ top-k(t)] / Σ w      (share of routed assignments)
    P_e = Σ_{layers, tokens} w_t · softmax(r_t)_e / Σ w      (mean router probability)
    aux = E · Σ_e f_e · P_e

where ``Σ w`` runs over layers and tokens and ``w_t`` is 1 for a real token, 0 for padding.
trl (dpo:895-905, 1530-1533) adds ``router_aux_loss_coef · aux`` to the DPO loss of the policy's
forward over the 2B plain rows and logs ``aux`` as ``aux_loss``; it does so when the config has
an ``output_router_logits`` attribute and the coefficient (``DPOConfig.router_aux_loss_coef``, else
the config's) is not 0.

With prompt sharing (``dpo_core.packing``) each prompt is forwarded once instead of twice, so
its tokens get ``w_t = 2``: the weighted sums are then the plain rows' sums term by term, and
``aux`` equals trl's up to float32 rounding, not only in expectation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpo_core.model_parts import unwrap_peft


@dataclass(frozen=True)
class RouterSpec:
    """What the loss needs from the config: E experts, top-k per token, and the coefficient."""

    num_experts: int
    top_k: int
    coef: float


def router_spec(model: nn.Module, coef: float | None = None) -> RouterSpec | None:
    """The model's routing, or None when trl adds no aux loss (not a MoE config with
    ``output_router_logits``, or a coefficient of 0). ``coef`` overrides the config's
    ``router_aux_loss_coef`` (trl's ``DPOConfig.router_aux_loss_coef``)."""
    config = getattr(unwrap_peft(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or not hasattr(text, "output_router_logits"):
        return None
    coef = getattr(text, "router_aux_loss_coef", None) if coef is None else coef
    if not coef:
        return None
    experts = next(
        (getattr(text, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
         if getattr(text, n, None)),
        None,
    )  # fmt: skip
    top_k = getattr(text, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return RouterSpec(int(experts), int(top_k), float(coef))


def check_router_setting(model: nn.Module, coef: float | None) -> None:
    """Raise ValueError when a coefficient is set for a model without a router (trl dpo:900-904):
    the setting would be silently ignored."""
    config = getattr(unwrap_peft(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if coef and not hasattr(text, "output_router_logits"):
        raise ValueError(
            f"router_aux_loss_coef is set to {coef} but {type(unwrap_peft(model)).__name__} is "
            "not a Mixture-of-Experts model that returns its router logits: there is no "
            "auxiliary loss to weight"
        )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], weights: torch.Tensor, spec: RouterSpec
) -> torch.Tensor:
    """``aux`` of the module docstring. ``router_logits``: one (T, E) tensor per MoE layer, the
    T tokens in the order of ``weights`` (T,). Float32 sums, as transformers' function."""
    w = weights.float()
    assigned = torch.zeros(spec.num_experts, device=w.device)
    probs = torch.zeros(spec.num_experts, device=w.device)
    total = torch.zeros((), device=w.device)
    for logits in router_logits:
        p = F.softmax(logits.to(w.device).float(), dim=-1)  # (T, E)
        top = p.topk(spec.top_k, dim=-1).indices  # (T, k)
        assigned = assigned.scatter_add(0, top.reshape(-1), w.repeat_interleave(spec.top_k))
        probs = probs + (p * w.unsqueeze(-1)).sum(dim=0)
        total = total + w.sum()
    return spec.num_experts * ((assigned / total) * (probs / total)).sum()


def router_logits_of(output) -> tuple[torch.Tensor, ...]:
    """The per-layer router logits a backbone returned with ``output_router_logits=True``."""
    logits = getattr(output, "router_logits", None)
    if not logits:
        raise ValueError(
            "the model's config asks for a router aux loss, but its backbone returned no "
            "router_logits with output_router_logits=True"
        )
    return tuple(logits)
