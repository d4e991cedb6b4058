"""The trl side of parity: a tiny run is well formed, and trl's step-1 numbers equal an
independent hand computation (full-vocabulary log_softmax on the saved policy and reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_core.settings import LossSettings
from parity.sides.cases import ParityCase
from parity.sides.models import ADAPTER_WEIGHTS
from parity.sides.result import STEP_METRICS, TOKEN_FIELDS
from parity.sides.trl_side import run_trl
from parity.sides.workspace import workspace_paths

BETA = 0.1


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2 steps of sigmoid DPO, 2 pairs a step, tiny llama, generated explicit-prompt rows."""
    torch.set_num_threads(1)
    case = ParityCase(
        name="tiny", steps=2, batch_size=2, loss=LossSettings(beta=BETA), vocab_size=300
    )
    workdir = tmp_path_factory.mktemp("trl_full")
    return case, workdir, run_trl(case, workdir)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """QLoRA (NF4 + LoRA), precomputed reference, conversational rows, grad accumulation 2."""
    torch.set_num_threads(1)
    case = ParityCase(
        name="qlora",
        steps=2,
        batch_size=1,
        grad_accum=2,
        data="conversational",
        lora=True,
        load_in_4bit=True,
        precompute_ref=True,
        vocab_size=300,
    )
    workdir = tmp_path_factory.mktemp("trl_qlora")
    return case, workdir, run_trl(case, workdir)


def test_full_run_is_well_formed(full_run):
    case, workdir, result = full_run
    assert len(result.steps) == case.steps
    for step in result.steps:
        assert set(STEP_METRICS) <= set(step)
        assert all(isinstance(v, float) and math.isfinite(v) for v in step.values())
    # Linear decay from the case's learning rate: lr_k = lr * (N - k) / N, k = 0..N-1.
    assert [s["learning_rate"] for s in result.steps] == [1e-3, 5e-4]
    # One epoch of generated rows, none dropped, every row BOS-prompted and EOS-terminated.
    tokenizer = workspace_paths(case, workdir).tokenizer()
    assert len(result.token_ids) == case.rows_needed and result.dropped_rows == 0
    for row in result.token_ids:
        assert set(row) == set(TOKEN_FIELDS)
        assert row["prompt_ids"][0] == tokenizer.bos_token_id
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_full_run_weights_are_the_trained_policy(full_run):
    case, workdir, result = full_run
    initial = _load(workspace_paths(case, workdir).policy_dir)
    names = {n for n, p in initial.named_parameters()}
    assert set(result.final_weights) == names
    moved = max(
        (result.final_weights[n] - p).abs().max().item() for n, p in initial.named_parameters()
    )
    # Adam's first steps move every weight by about lr = 1e-3, far above float32 noise.
    assert moved > 1e-4


def test_step1_matches_hand_computation(full_run):
    """Step-1 loss, rewards and logps recomputed from the saved files and trl's token ids.

    By hand: rows [p+c_0, p+c_1, p+r_0, p+r_1] right-padded; logp_t = log_softmax(logits_{t-1})
    at token t, summed over completion tokens; loss = mean(-logsigmoid(beta * ((pi_c - ref_c) -
    (pi_r - ref_r)))), rewards = beta * (pi - ref).
    """
    case, workdir, result = full_run
    ws = workspace_paths(case, workdir)
    rows = result.token_ids[: case.batch_size]
    pad = ws.tokenizer().pad_token_id
    ids, attention, completion = _collate(rows, pad)
    policy_c, policy_r = _sequence_logps(_load(ws.policy_dir), ids, attention, completion)
    ref_c, ref_r = _sequence_logps(_load(ws.reference_dir), ids, attention, completion)
    chosen, rejected = BETA * (policy_c - ref_c), BETA * (policy_r - ref_r)
    loss = -F.logsigmoid(chosen - rejected).mean().item()
    step1 = result.steps[0]
    # trl's chunked fused head vs a plain log_softmax: same float32 math, another summation
    # order; measured 1.2e-7 (notes §4), so 1e-6 is the step-1 bound with headroom.
    assert step1["loss"] == pytest.approx(loss, abs=1e-6)
    assert step1["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert step1["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-6)
    # Summed logps near -50: one float32 ulp is ~4e-6, so a relative 1e-6 is a few ulps.
    assert step1["logps/chosen"] == pytest.approx(policy_c.mean().item(), rel=1e-6)
    assert step1["logps/rejected"] == pytest.approx(policy_r.mean().item(), rel=1e-6)
    # The reference really differs: with reference == policy the loss would be exactly log 2.
    assert abs(loss - math.log(2)) > 1e-4


def test_qlora_run_trains_the_shared_adapter(qlora_run):
    case, workdir, result = qlora_run
    assert len(result.steps) == case.steps
    assert result.packed_4bit_layers == []  # bitsandbytes' CPU repacking is off (four_bit)
    assert all(set(STEP_METRICS) <= set(s) for s in result.steps)
    initial = load_file(str(workspace_paths(case, workdir).adapter_init_dir / ADAPTER_WEIGHTS))
    # Final weights are exactly the adapter, named as peft names it.
    assert set(result.final_weights) == set(initial)
    assert all("lora_A" in n or "lora_B" in n for n in initial)
    for name, weight in result.final_weights.items():
        moved = (weight.float() - initial[name]).abs().max().item()
        if "lora_B" in name:
            # peft initialises B to zero; 2 Adam steps at lr 1e-3 move it by ~1e-3.
            assert initial[name].abs().max().item() == 0.0 and moved > 1e-4
        else:
            # A gets no gradient at step 1 (B = 0) and moves by at most ~0.75 lr at step 2, plus
            # bf16 rounding of |A| ~ 0.1 (2.5e-4): training started from the shared adapter, not
            # from an adapter of trl's own drawing (entries ~0.1 apart).
            assert moved < 2e-3


def _load(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _collate(rows: list[dict], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2B, L) ids, attention mask and completion mask: chosen rows first, right-padded."""
    seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    seqs += [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    length = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), length), pad)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    completion = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    return ids, attention, completion


@torch.no_grad()
def _sequence_logps(model, ids, attention, completion) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion logps, (B,) chosen and (B,) rejected, from full-vocabulary logits."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    sums = (token_logps * completion[:, 1:]).sum(-1)
    return sums.chunk(2)
