"""parity.check.compare on bf16 weights (QLoRA adapters, in ulps) and 4-bit layers left packed."""

from __future__ import annotations

import pytest
import torch

from parity.check.compare import compare_runs, compare_weights, ulp_difference
from parity.sides.result import RunResult
from tests.parity.check.test_compare import check, failing, make_run


def bf16_run(weights: torch.Tensor) -> RunResult:
    run = make_run()
    run.final_weights = {"w": weights.to(torch.bfloat16)}
    return run


def test_bf16_weights_are_compared_in_ulps_of_their_scale():
    """One bf16 rounding step at the tensor's scale (eps * max|w| = 2^-8 * 0.5) passes, two
    fail, also on an element far smaller than the scale; float32 stays absolute."""
    a = torch.tensor([0.5, 0.01, 0.0], dtype=torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps * 0.5
    one, two = a.double().clone(), a.double().clone()
    one[1] += step
    two[1] += 2 * step
    assert ulp_difference(a, one.to(torch.bfloat16)) == pytest.approx(1.0, abs=0.05)
    assert ulp_difference(a, two.to(torch.bfloat16)) == pytest.approx(2.0, abs=0.05)
    trl = RunResult(steps=[], token_ids=[], final_weights={"w": a})
    ours = RunResult(steps=[], token_ids=[], final_weights={"w": one.to(torch.bfloat16)})
    result = compare_weights(trl, ours)
    assert result.name == "final_weights (ulps)" and result.tolerance == 1.0 and result.passed
    ours.final_weights = {"w": two.to(torch.bfloat16)}
    assert not compare_weights(trl, ours).passed
    # The same 2-step difference in float32 is 3.9e-3 absolute: over the 1e-4 bound.
    trl = RunResult(steps=[], token_ids=[], final_weights={"w": a.float()})
    ours = RunResult(steps=[], token_ids=[], final_weights={"w": two.float()})
    result = compare_weights(trl, ours)
    assert result.name == "final_weights" and not result.passed


@pytest.mark.parametrize(
    ("step", "delta", "fails"),
    [
        (2, 0.9 * 2**-7, set()),  # one bf16 rounding step of the gradient: allowed after step 1
        (2, 1.1 * 2**-7, {"grad_norm"}),
        (0, 1.1e-6, {"grad_norm@1"}),  # step 1 keeps 1e-6: same weights, same gradients
    ],
)
def test_bf16_trainable_weights_loosen_grad_norm_after_step_1_only(step, delta, fails):
    weights = torch.linspace(-1, 1, 8)
    trl, ours = bf16_run(weights), bf16_run(weights)
    ours.steps[step]["grad_norm"] += delta
    report = compare_runs("qlora", trl, ours)
    assert failing(report) == fails
    assert check(report, "grad_norm").tolerance == 2**-7
    assert check(report, "grad_norm@1").tolerance == 1e-6
    assert check(report, "loss").tolerance == 1e-5  # nothing else is loosened


def test_a_side_whose_4bit_layers_were_packed_fails_and_is_named():
    trl, ours = make_run(), make_run()
    assert check(compare_runs("c", trl, ours), "packed_4bit").passed
    ours.packed_4bit_layers = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    report = compare_runs("c", trl, ours)
    packed = check(report, "packed_4bit")
    assert failing(report) == {"packed_4bit"} and packed.max_diff == 2
    assert packed.note == "ours: model.layers.0.mlp.up_proj (+1)"
    trl.packed_4bit_layers = ["model.layers.1.self_attn.q_proj"]  # both sides packed: no excuse
    packed = check(compare_runs("c", trl, ours), "packed_4bit")
    assert packed.max_diff == 3 and packed.note.startswith("trl: model.layers.1.self_attn.q_proj")
