"""CUDA checks, opt-in (``-m gpu``): the LM head, a short training run and QLoRA on the GPU, each
held to an independent computation on the CPU.

    pytest -m gpu -q                               # on a CUDA machine (python -m parity.gpu_check)
    DPO_GPU_TESTS_ON_CPU=1 pytest -m gpu -q        # "the device" is the CPU: checks these tests

The default run deselects them (pyproject's ``addopts = -m "not gpu"``); ``-m gpu`` without a
GPU skips them unless ``DPO_GPU_TESTS_ON_CPU=1`` (what ``parity.gpu_check --dry-run`` sets), which
runs every comparison with the CPU standing in for the GPU: the tests' code and tolerances run,
the device's own numerics do not.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

from dpo_core.lm_head import selected_logps
from dpo_core.logp_types import LogpOptions
from tests.dpo_core.oracle import plain_token_logps
from tests.dpo_core.test_lm_head import float64_head
from tests.training.conftest import STEP_KEYS, assert_steps_close, base_args, fit, fixed_batch

pytestmark = pytest.mark.gpu

ON_CPU = "DPO_GPU_TESTS_ON_CPU"
# Three steps at a high learning rate (tests/training/test_invariance.py): from step 2 on the
# policy has moved, so the later rows check the update as well as the forward.
STEPS = {"max_steps": 3, "learning_rate": 5e-3}
# bf16-mixed against bf16-mixed on another device. On CPU, a bf16-mixed run of these 3 steps is
# within 2.1e-3 of the float32 run (relative, grad_norm at step 1; <= 8.4e-4 on every other
# metric), so two bf16 runs whose kernels round differently are within ~4e-3 of each other;
# 1e-2 keeps a 2.5x margin. rewards/accuracies is left out: a pair's margin near 0 may change
# sign under any rounding. (fp32 runs are held to STEP_TOL on every metric, as any two float32
# computations of the same rows in tests/training/test_invariance.py.)
BF16_STEP_TOL = 1e-2
BF16_KEYS = tuple(k for k in STEP_KEYS if k != "rewards/accuracies")


@pytest.fixture(scope="module")
def device() -> str:
    """``cuda``; ``cpu`` with ``DPO_GPU_TESTS_ON_CPU=1``; else the module is skipped."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get(ON_CPU) == "1":
        return "cpu"
    pytest.skip(f"needs a CUDA device (or {ON_CPU}=1 to run on the CPU)")


# ---- the LM head ---------------------------------------------------------------------------


def head_problem(tokens: int = 300, hidden: int = 64, vocab: int = 5000):
    """T hidden states, targets, a Linear head and the weights of the backward's sum."""
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(hidden, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) / hidden**0.5)
        head.bias.copy_(torch.randn(vocab, generator=g) * 0.1)
    h = torch.randn(tokens, hidden, generator=g) * 2
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    weights = torch.rand(tokens, generator=g)
    return h, targets, head, weights


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers (8 significant bits) at ``x`` > 0."""
    return 2.0 ** (math.floor(math.log2(x)) - 7)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_selected_logps_on_device_equal_a_float64_cpu_computation(device, bf16):
    """The custom head Function on the device, in chunks, against float64 on the CPU.

    float32: logits are 64-term sums of |z| <= 13; measured on CPU, logps are within 2e-6 and
    the gradients within 3e-7 (relative); 2e-5 and 1e-5 admit any summation order, while TF32
    (10-bit mantissa) misses by ~1e-3. bf16 autocast: the float64 side rounds where the kernel
    does, so they differ only where float32 accumulation flips a bf16 rounding of a logit
    (rare: measured on CPU, mean |Δ logp| 4e-7, gradients 2e-6). A flip moves a log-prob by at
    most two bf16 ulps of the largest |z|; the mean (1e-4) and the gradients (5e-4) reject a
    kernel missing one of the roundings (measured: mean 5e-3, gradients 3e-3).
    """
    h, targets, head, weights = head_problem()
    want, want_grads, max_abs_logit = float64_head(h, targets, head, weights, bf16)
    dev_head = copy.deepcopy(head).to(device)
    dev_h = h.to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logps, _ = selected_logps(
            dev_h, targets.to(device), dev_head, None, LogpOptions(chunk_size=128)
        )
    (logps * weights.to(device)).sum().backward()
    got_grads = (dev_h.grad, dev_head.weight.grad, dev_head.bias.grad)

    err = (logps.detach().cpu().double() - want).abs()
    if bf16:
        assert err.max() <= 2 * bf16_ulp(max_abs_logit) and err.mean() <= 1e-4, err.max()
    else:
        assert err.max() <= 2e-5, err.max()
    grad_tol = 5e-4 if bf16 else 1e-5  # relative, on the whole tensor
    for name, got, ref in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        err = (got.cpu().double() - ref).norm() / ref.norm()
        assert err <= grad_tol, f"grad {name}: relative error {err:.2e} > {grad_tol:g}"


# ---- a short training run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """``runs(accelerator, precision)``: the 3-step run's per-step metrics, each run once (on the
    CPU stand-in "gpu" and "cpu" are the same run)."""
    done: dict[tuple[str, str], list[dict]] = {}

    def get(accelerator: str, precision: str) -> list[dict]:
        key = ("cpu" if accelerator == "cpu" or not torch.cuda.is_available() else "gpu", precision)
        if key not in done:
            out = tmp_path_factory.mktemp(f"fit-{key[0]}-{precision}")
            flags = {**STEPS, "accelerator": key[0], "precision": precision}
            done[key] = fit(base_args(tiny_assets, out, **flags)).history
        return done[key]

    return get


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_on_device_matches_the_cpu_run(device, runs, precision):
    """``training.fit --accelerator gpu``, 3 steps: every step's loss, rewards, logps and
    grad_norm equal the CPU run's (float32: conftest's ``STEP_TOL``; bf16-mixed:
    ``BF16_STEP_TOL``)."""
    on_device, on_cpu = runs("gpu", precision), runs("cpu", precision)
    assert on_device[1]["rewards/margins"] != 0  # step 2 already depends on the update
    if precision == "32-true":
        assert_steps_close(on_device, on_cpu)
    else:
        assert_steps_close(on_device, on_cpu, keys=BF16_KEYS, tol=BF16_STEP_TOL)


def test_bf16_mixed_on_device_is_not_float32(device, runs):
    """bf16-mixed really ran in bf16 on the device: its step-1 grad_norm differs from the
    float32 run's (by ~2e-3 relative on CPU), which a silently float32 run would not."""
    assert runs("gpu", "bf16-mixed")[0]["grad_norm"] != runs("gpu", "32-true")[0]["grad_norm"]


# ---- QLoRA --------------------------------------------------------------------------------


def qlora_policy(assets, tmp_path, device: str, compute_dtype: str):
    """The 4-bit NF4 policy with fresh LoRA adapters (float32), as training loads it, on
    ``device``."""
    from training.base.cli import resolve_config
    from training.inputs.model_loading import load_policy

    flags = {
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": compute_dtype,
        "qlora_adapter_dtype": "float32",
    }
    cfg, _ = resolve_config(base_args(assets, tmp_path, **flags))
    return load_policy(str(assets.model_dir), cfg).to(device)


def test_qlora_forward_backward_on_device(device, tiny_assets, tmp_path):
    """4-bit base + LoRA under bf16 autocast on the device: finite log-probs, every LoRA-B
    gradient finite and non-zero (B starts at 0, so A's gradients are 0 at the first step), no
    gradient on the 4-bit weights."""
    model = qlora_policy(tiny_assets, tmp_path, device, "bfloat16")
    batch = fixed_batch(tiny_assets).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logps = plain_token_logps(model, batch).row_sums()
    assert torch.isfinite(logps).all()
    logps.sum().backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 7  # q k v o gate up down
    for name, grad in lora_b.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, f"{name}: zero gradient"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_on_device_equals_its_float_twin_on_cpu(device, tiny_assets, tmp_path):
    """With a float32 compute dtype the device's 4-bit matmuls dequantize NF4 and multiply in
    float32: the log-probs equal those of the float twin (every 4-bit weight replaced by its
    dequantized float32 copy, tests/training/test_four_bit.py) on the CPU, within float32
    rounding of ~70-nat sums (1e-5 relative, that file's ``TWIN_REL_TOL``)."""
    from tests.training.test_four_bit import TWIN_REL_TOL, save_float_twin

    model = qlora_policy(tiny_assets, tmp_path / "q", device, "float32")
    batch = fixed_batch(tiny_assets)
    with torch.no_grad():
        got = plain_token_logps(model, batch.to(device)).row_sums().cpu()
    twin_dir = tmp_path / "twin"
    save_float_twin(model, tiny_assets.model_dir, twin_dir)  # dequantizes on the device
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(twin_dir, dtype=torch.float32)
    with torch.no_grad():
        want = plain_token_logps(twin, batch).row_sums()
    torch.testing.assert_close(got, want, rtol=TWIN_REL_TOL, atol=TWIN_REL_TOL)
