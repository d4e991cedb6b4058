"""dpo_core.router_aux: a MoE router's load-balancing loss, added to the DPO loss as trl adds it,
equal to transformers' own function on the plain rows and to the plain rows' value when each
prompt is forwarded once (prompt tokens weighted 2, the packed call's padding 0)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from dpo_core.logp_types import LogpOptions
from dpo_core.logps import token_logps
from dpo_core.packing import packed_layout
from dpo_core.reference import FrozenCopyReference
from dpo_core.router_aux import check_router_setting, router_spec
from dpo_core.settings import LossSettings
from dpo_core.step import DPOSettings, dpo_step
from parity.sides.zoo import tiny_zoo_model
from tests.dpo_core.test_packing import pair_batch

torch.set_num_threads(1)

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe"]
# The loss is ~2 (E Σ f_e P_e with near-uniform routing); packed rows sum the same weighted
# terms in another order (and route from states equal up to rounding): a few float32 ulps of 2.
AUX_TOL = dict(rtol=0.0, atol=8 * torch.finfo(torch.float32).eps * 2)


@pytest.mark.parametrize("model_type", MOE)
def test_plain_rows_equal_transformers_and_packed_rows_equal_plain(model_type):
    model, batch = tiny_zoo_model(model_type), pair_batch()
    spec = router_spec(model)
    out = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        output_router_logits=True, use_cache=False,
    )  # fmt: skip
    want = load_balancing_loss_func(out.router_logits, spec.num_experts, spec.top_k,
                                    batch.attention_mask)  # fmt: skip
    plain = token_logps(model, batch, LogpOptions(router_aux=True, prompt_sharing=False))
    torch.testing.assert_close(plain.aux_loss, want, rtol=0.0, atol=0.0)
    for padding_free in (True, False):
        layout = packed_layout(model, batch, padding_free)
        # padding positions in the one packed call, routed but weighted 0
        assert layout.num_rows * layout.row_length > sum(layout.fills)
        options = LogpOptions(router_aux=True, padding_free=padding_free)
        torch.testing.assert_close(token_logps(model, batch, options).aux_loss, want, **AUX_TOL)


def test_the_step_adds_the_weighted_aux_loss_and_logs_it():
    model, batch = tiny_zoo_model("mixtral"), pair_batch()
    reference = FrozenCopyReference(tiny_zoo_model("mixtral", seed=1))
    coef = router_spec(model).coef
    with_aux = dpo_step(model, batch, reference, DPOSettings())
    without = dpo_step(model, batch, reference, DPOSettings(LossSettings(router_aux_loss_coef=0)))
    aux = with_aux.sums["aux_loss"]
    assert "aux_loss" not in without.sums and float(aux) > 0
    torch.testing.assert_close(with_aux.loss, without.loss + coef * aux, rtol=1e-6, atol=0.0)
    doubled = dpo_step(
        model, batch, reference, DPOSettings(LossSettings(router_aux_loss_coef=2 * coef))
    )
    torch.testing.assert_close(doubled.loss, without.loss + 2 * coef * aux, rtol=1e-6, atol=0.0)
    gate = next(p for n, p in model.named_parameters() if "gate.weight" in n or "router" in n)
    grad = torch.autograd.grad(with_aux.loss, gate)[0] - torch.autograd.grad(without.loss, gate)[0]
    assert float(grad.abs().max()) > 0  # the router is trained by the aux loss


def test_no_router_no_aux_loss_and_a_coefficient_for_it_is_refused():
    model = tiny_zoo_model("llama")
    assert router_spec(model) is None
    check_router_setting(model, None)
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        check_router_setting(model, 0.01)
    step = dpo_step(model, pair_batch(), FrozenCopyReference(tiny_zoo_model("llama", seed=1)),
                    DPOSettings())  # fmt: skip
    assert "aux_loss" not in step.sums
