"""``--strategy fsdp``: FSDP2 ``fully_shard`` on CPU processes over gloo (``training.run.sharding``).

- 2 sharded processes x B/2 pairs train as 1 process x B pairs, step by step (loss, rewards,
  log-probs, grad_norm within ``STEP_TOL``; token counts exact) and to the same final weights
  (``WEIGHTS_REL_TOL``): full fine-tuning with a live sharded reference (with gradient
  accumulation and clipping that bites, so the clipped norm must be the global one), with a
  precomputed reference, LoRA (base sharded too), uneven padding-free rows, processes whose
  rows take different paths (one packs, the other runs plain), bf16-mixed, and SmolLM2-135M
  (full and LoRA);
- each process holds half the parameters, gradients and optimizer state (its memory line);
- ``model/`` is an ordinary Hugging Face directory (``from_pretrained`` / ``PeftModel``);
- the held-out evaluation during training (``--eval-every-n-steps``) and gradient checkpointing
  give the same numbers as one process.

Sharded checkpoints and ``--resume``: ``test_sharded_checkpoint.py``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import load_hh_rows
from tests.training import forward_spy
from tests.training.conftest import (
    STEP_KEYS,
    STEP_TOL,
    assert_steps_close,
    assert_weights_close,
    base_args,
    child_env,
    fit,
    load_weights,
    read_metrics,
)
from training.base.cli import resolve_config
from training.base.errors import RunError
from training.run.sharding import decoder_layers, lightning_strategy

# Three steps at a high learning rate: rewards are non-zero from step 1 and depend on every row.
STEPS = {"max_steps": 3, "learning_rate": 5e-3}
MEMORY = re.compile(r"memory \(process (\d) of (\d)\): parameters ([\d.]+) of ([\d.]+) MiB, "
                    r"gradients ([\d.]+) of ([\d.]+) MiB, optimizer ([\d.]+) of ([\d.]+) MiB")  # fmt: skip


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    """32 real hh-rlhf rows (implicit prompts, uneven lengths)."""
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_hh_rows(32)))
    return path


def fit_sharded(argv: list[str], timeout: float = 600, spy=None, devices: int = 2) -> str:
    """``python -m training.fit argv --strategy fsdp --devices <devices>`` in a child, one
    thread per process (2 in all: this machine's cores); its output, after checking it
    succeeded. With ``spy`` (a folder), every process's log-prob forwards are recorded there
    (``tests.training.forward_spy``)."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = child_env() | {"OMP_NUM_THREADS": "1"}
    module = "training.fit"
    if spy is not None:
        env[forward_spy.ENV], module = str(spy), "tests.training.forward_spy"
    command = [sys.executable, "-m", module, *argv, "--strategy", "fsdp"]
    command += ["--devices", str(devices)]
    child = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout + child.stderr


def single(argv: list[str]):
    """The one-process run, at one thread (as each sharded process: a run sets its own thread
    layout, ``training.run.threads``, so the count is a flag, not the caller's setting)."""
    return fit([*argv, "--threads", "1"])


def assert_half_held(output: str) -> None:
    """Both processes report holding half of the parameters, gradients and optimizer state
    (FSDP2 pads each shard to equal rows: within 5% of half, on models of ~0.1-0.5 MiB)."""
    lines = MEMORY.findall(output)
    assert sorted(line[0] for line in lines) == ["1", "2"], output[-2000:]
    for line in lines:
        values = [float(v) for v in line[2:]]
        for held, whole in zip(values[::2], values[1::2], strict=True):
            assert whole > 0 and abs(held - whole / 2) <= 0.05 * whole, line


def compare(tiny_assets, tmp_path, grad_norm_tol: float = STEP_TOL, spy=None, **options):
    """2 sharded processes x 2 pairs against 1 process x 4 pairs; returns the sharded output."""
    sharded = tmp_path / "fsdp"
    output = fit_sharded(base_args(tiny_assets, sharded, batch_size=2, **options), spy=spy)
    one = single(base_args(tiny_assets, tmp_path / "single", batch_size=4, **options))
    rows = read_metrics(sharded)
    assert rows[-1]["rewards/margins"] != 0
    # Both halves of every step's rows were seen: the token count adds up exactly.
    assert [r["num_tokens"] for r in rows] == [r["num_tokens"] for r in one.history]
    assert_steps_close(rows, one.history, keys=tuple(k for k in STEP_KEYS if k != "grad_norm"))
    assert_steps_close(rows, one.history, keys=("grad_norm",), tol=grad_norm_tol)
    return output, one


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed"])
def test_two_sharded_processes_equal_one_process(tiny_assets, tmp_path, precompute):
    """With 2 micro-batches accumulated and a clipping norm below every step's gradient norm:
    clipping each process's shard by its own norm would update differently."""
    from transformers import AutoModelForCausalLM

    options = dict(
        precompute_ref_log_probs=precompute,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,
        **STEPS,
    )
    output, one = compare(tiny_assets, tmp_path, **options)
    assert all(r["grad_norm"] > 0.05 for r in one.history)  # clipping bit on every step
    assert_half_held(output)
    model_dir = tmp_path / "fsdp" / "model"
    assert_weights_close(model_dir, one.model_dir, tiny_assets.model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    saved = load_weights(model_dir)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved.get(name, tensor)), name
    assert (tmp_path / "fsdp" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded


@pytest.mark.slow
def test_sharded_lora_equals_one_process(tiny_assets, tmp_path):
    """LoRA with its frozen base sharded; the reference is the policy with adapters off."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    compare(tiny_assets, tmp_path, lora=True, lora_r=4, **STEPS)
    adapters = [load_weights(tmp_path / run / "model") for run in ("fsdp", "single")]
    assert adapters[0].keys() == adapters[1].keys()
    for name in (n for n in adapters[0] if "lora_B" in n):  # B starts at 0: its norm is travel
        a, b = adapters[0][name], adapters[1][name]
        assert torch.linalg.vector_norm(a - b) <= 1e-3 * torch.linalg.vector_norm(b), name
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    PeftModel.from_pretrained(base, tmp_path / "fsdp" / "model")


def one_call_per_forward(spy) -> dict[int, list[dict]]:
    """Both processes' recorded forwards (``forward_spy``), after checking that each made one
    backbone call and that the processes made as many forwards as each other."""
    records = forward_spy.read(spy)
    assert sorted(records) == [0, 1]
    assert len(records[0]) == len(records[1]) > 0
    assert all(r["calls"] == 1 for rank in records.values() for r in rank), records
    return records


@pytest.mark.slow
def test_sharded_uneven_padding_free_rows_equal_one_process(tiny_assets, tmp_path, hh_file):
    """Real hh-rlhf rows of uneven lengths, padding-free on both sides (two pairs share a row in
    some process's step): each process's packed rows go through the backbone in one call, as
    the one process's do."""
    spy = tmp_path / "spy"
    spy.mkdir()
    compare(tiny_assets, tmp_path, spy=spy, dataset=hh_file, max_length=128, **STEPS)
    records = one_call_per_forward(spy)
    training = [r for rank in records.values() for r in rank if r["grad"]]
    assert any(r["rows"] is not None and r["rows"] < r["pairs"] for r in training), training


def mixed_rows(n: int = 12) -> list[dict]:
    """hh-rlhf words in two shapes: even rows (process 0's, ``EpochSampler``) a long prompt and
    one-word answers, where packing saves work (a prompt forwarded once; both pairs share a
    row); odd rows (process 1's) a one-word prompt and two 40-word answers, where the packed
    segment's attention costs more than the plain rows (``pair_layout.layout_cost``)."""
    words = " ".join(r["chosen"] for r in load_hh_rows(40)).split()
    rows = []
    for i in range(n):
        text = words[i * 80 : (i + 1) * 80]
        if i % 2 == 0:
            prompt = " ".join(text[: 45 if i % 4 == 0 else 12])
            rows.append({"prompt": prompt, "chosen": " Yes.", "rejected": " No."})
        else:
            answers = " " + " ".join(text[:40]), " " + " ".join(text[40:80])
            rows.append({"prompt": "Hi.", "chosen": answers[0], "rejected": answers[1]})
    return rows


@pytest.mark.slow
def test_sharded_processes_on_different_paths_equal_one_process(tiny_assets, tmp_path):
    """Every step, process 0 packs its two pairs padding-free into one row while process 1's
    pairs run the plain forward (the cost model decides per process, on its own rows), for the
    policy and the live sharded reference: one backbone call each, so the processes stay in
    step, and the run equals one process x 4 pairs."""
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_rows()))
    spy = tmp_path / "spy"
    spy.mkdir()
    options = dict(dataset=data, max_length=128, precompute_ref_log_probs=False, **STEPS)
    compare(tiny_assets, tmp_path, spy=spy, **options)
    records = one_call_per_forward(spy)
    assert len(records[0]) == 2 * STEPS["max_steps"]  # policy and reference, each step
    assert all(r["rows"] == 1 and r["pairs"] == 2 for r in records[0]), records[0]
    assert all(r["rows"] is None for r in records[1]), records[1]


@pytest.mark.slow
def test_sharded_bf16_mixed_equals_one_process(tiny_assets, tmp_path):
    """bf16 autocast over float32 sharded weights (all-gathered in float32)."""
    sharded = tmp_path / "fsdp"
    options = dict(precision="bf16-mixed", **STEPS)
    fit_sharded(base_args(tiny_assets, sharded, batch_size=2, **options))
    one = single(base_args(tiny_assets, tmp_path / "single", batch_size=4, **options))
    # bf16 products over a differently grouped call (each process's packed rows against the
    # one process's) round differently: measured up to 8e-4 relative on these
    # metrics; 4e-3 is one bf16 ulp (2^-8), while a changed row or a lost micro-batch moves them
    # by >= 1e-2 (STEP_TOL's reasoning).
    assert_steps_close(read_metrics(sharded), one.history, tol=4e-3)


def heldout_rows(output_dir) -> list[dict[str, float]]:
    """The rows of ``<output_dir>/metrics.csv`` that hold a held-out pass (``eval_*``)."""
    import csv

    with open(output_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [r for r in rows if "eval_loss" in r]


@pytest.mark.slow
def test_sharded_evaluation_during_training_equals_one_process(tiny_assets, tmp_path):
    """``--eval-every-n-steps 2`` over 4 steps: each sharded process runs every held-out batch
    (the same forward calls on each, as FSDP's collectives need) and the metrics are reduced
    across processes: the held-out numbers equal one process's after steps 2 and 4."""
    options = dict(max_steps=4, learning_rate=5e-3, eval_fraction=0.25, eval_every_n_steps=2)
    compare(tiny_assets, tmp_path, **options)
    sharded, one = heldout_rows(tmp_path / "fsdp"), heldout_rows(tmp_path / "single")
    assert [r["step"] for r in sharded] == [r["step"] for r in one] == [2, 4]  # trl's count
    keys = ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
    assert_steps_close(sharded, one, keys=keys)
    assert sharded[0]["eval_loss"] != sharded[1]["eval_loss"]  # the weights moved in between


@pytest.mark.slow
def test_sharded_gradient_checkpointing_equals_one_process(tiny_assets, tmp_path):
    """Each decoder layer's forward runs again in backward (non-reentrant checkpointing):
    under FSDP2 the recomputation gathers the layer's unit once more; the numbers are those of
    one process with gradient checkpointing."""
    output, _ = compare(tiny_assets, tmp_path, gradient_checkpointing=True, **STEPS)
    assert_half_held(output)
    model_dir = tmp_path / "fsdp" / "model"
    assert_weights_close(model_dir, tmp_path / "single" / "model", tiny_assets.model_dir)


SMOLLM2 = dict(max_steps=2, learning_rate=1e-4, max_length=48)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_smollm2_equals_one_process(smollm2, tiny_assets, tmp_path, lora):
    """SmolLM2-135M-Instruct (tied embeddings: embedding and head in the root unit).

    grad_norm: each parameter's gathered gradient equals one process's within 2.5e-7 relative
    (measured), but a sharded gradient's norm is summed shard by shard, a float32 order that
    differs from the whole tensor's: 1.5e-5 relative measured on SmolLM2's 28M-element
    embedding; 1e-4 bounds that, while a gradient of the wrong rows or scale moves it by 1e-2."""
    options = dict(model=smollm2, lora=lora, **SMOLLM2)
    compare(tiny_assets, tmp_path, grad_norm_tol=1e-4, **options)
    if not lora:
        assert_weights_close(tmp_path / "fsdp" / "model", tmp_path / "single" / "model", smollm2)


def test_fsdp_maps_to_fsdp2_on_every_process():
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg, _ = resolve_config(["--strategy", "fsdp", "--devices", "2", "--num-nodes", "2"])
    strategy = lightning_strategy(cfg)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    ddp, _ = resolve_config(["--strategy", "ddp"])
    assert lightning_strategy(ddp) == "ddp"


def test_decoder_layers_are_the_no_split_modules(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(RunError, match="names no decoder layer class"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "deepspeed"], "needs the deepspeed package, which is not installed"),
        (["--strategy", "fsdp", "--precision", "16-mixed"], "--strategy fsdp takes --precision"),
        (["--strategy", "fsdp", "--lora", "--load-in-4bit"], "cannot shard 4-bit weights"),
    ],
)
def test_an_unusable_strategy_is_one_line_before_loading(
    flags, message, tmp_path, capsys, monkeypatch
):
    """No traceback, nothing loaded or written (deepspeed shown as missing, wherever it is)."""
    import importlib.util

    from training.fit import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a),
    )

    out = tmp_path / "run"
    assert main([*flags, "--accelerator", "cpu", "--output-dir", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()
