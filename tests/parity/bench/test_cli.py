"""parity.bench: the side-by-side benchmark runs end to end and refuses disagreeing losses."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from dpo_core.data import tokenize_rows
from parity.bench import flops
from parity.bench.cli import (
    build_parser,
    loss_check,
    main,
    matmul_peaks,
    resolve_preset,
    summarize,
    with_utilisation,
)
from parity.bench.flops import Pass
from parity.bench.presets import (
    MODEL_SOURCES,
    PRESETS,
    Preset,
    _random_word_corpus,
    bench_case,
    prepare_assets,
    single_token_words,
    synthetic_rows,
    with_overrides,
)
from parity.bench.table import bench_table
from parity.sides.datasets_io import HH_RLHF_FILE
from training.embedded.tokenizer import train_tokenizer
from training.inputs.gguf import MODEL_NAME, default_cache_dir, is_model_dir

SIDE_KEYS = {
    "side", "trainer", "settings", "exact", "description", "losses", "step_seconds",
    "step_cpu_seconds", "cpu_seconds_per_step", "profile",
    "step_completion_tokens", "setup_seconds", "rss_at_start_mb", "threads",
    "openmp_wait_policy", "peak_rss_mb",
    "peak_cuda_mb", "seconds_per_step", "completion_tokens_per_second", "parameters",
    "trainable_parameters",
    # FLOP accounting (parity.bench.flops)
    "step_flops", "step_model_flops", "compute_dtype", "matmul_peak_flops_per_s",
    "decoder_shape", "flops_per_step", "flops_breakdown", "model_flops_per_step", "flops_per_s",
    "model_flops_per_s", "peak_dtype", "peak_flops_per_s", "mfu", "hfu",
}  # fmt: skip
REPORT_KEYS = {
    "ours", "trl", "trl_defaults", "speedup", "peak_memory_ratio", "speedup_vs_trl_defaults",
    "bf16_speedup",
    "variants", "peak_flops_per_s", "peak_flops_per_s_by_dtype", "loss_check", "config",
}  # fmt: skip


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
    """ours, trl (parity), trl (defaults) and ours in bf16, each in its own process, on the tiny
    preset."""
    out = tmp_path / "bench.json"
    status = main(["--preset", "tiny", "--workdir", str(tmp_path / "work"), "--json", str(out),
                   "--sides", "trl", "ours", "trl_defaults", "ours_bf16", "--profile"])  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS
    preset = PRESETS["tiny"]
    steps = preset.warmup + preset.steps
    # 2 pairs x 2 rows x 12 completion tokens (11 words + EOS) in every step, on both sides
    tokens_per_step = preset.batch_size * 2 * preset.completion_tokens
    for name in ("ours", "trl", "trl_defaults"):
        side = report[name]
        assert set(side) == SIDE_KEYS
        assert len(side["losses"]) == len(side["step_seconds"]) == steps
        assert len(side["step_cpu_seconds"]) == steps
        assert side["step_completion_tokens"] == [tokens_per_step] * steps
        assert side["peak_rss_mb"] > 100 and side["threads"] == preset.threads
        assert side["peak_cuda_mb"] is None
        assert side["trainable_parameters"] == side["parameters"]  # full fine-tuning
        # the last step ran under the profiler: its ops are listed, and it is not timed
        assert {"op", "self_seconds", "share", "calls"} <= set(side["profile"][0])
        assert any(op["op"] in ("aten::mm", "aten::addmm") for op in side["profile"])
        assert side["seconds_per_step"] == pytest.approx(
            sorted(side["step_seconds"][preset.warmup : -1])[(preset.steps - 1) // 2]
        )
    assert report["speedup"] == pytest.approx(
        report["trl"]["seconds_per_step"] / report["ours"]["seconds_per_step"]
    )
    assert report["peak_memory_ratio"] == pytest.approx(
        report["ours"]["peak_rss_mb"] / report["trl"]["peak_rss_mb"]
    )
    check = report["loss_check"]
    assert check["ok"] and check["max_diff"]["ours"] <= check["tolerance"] == 1e-5
    # "ours" is what training.fit runs by default: this one-epoch run precomputed its reference
    assert list(
        (tmp_path / "work" / "runs" / "ours" / "run" / "reference_logps").glob("train-*.pt")
    )
    assert set(report["config"]["machine"]["cpu_features"]) <= {
        "avx2",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
    }
    # bf16 autocast moves trl's own losses far more than float32 rounding does
    assert check["max_diff"]["trl_defaults"] > 10 * check["max_diff"]["ours"]
    # each side waits as its users' runs do: ours as training.fit (passive, unless the
    # environment chose), trl with libgomp's default (or the environment's choice)
    chosen = os.environ.get("OMP_WAIT_POLICY")
    assert report["ours"]["openmp_wait_policy"] == (chosen or "PASSIVE")
    assert report["trl"]["openmp_wait_policy"] == (chosen or "libgomp default")
    # ours_bf16 runs its matmuls in bf16 and is measured against the bf16 matmul peak
    bf16 = report["variants"]["ours_bf16"]
    assert bf16["compute_dtype"] == bf16["peak_dtype"] == "bfloat16"
    assert bf16["peak_flops_per_s"] == report["peak_flops_per_s_by_dtype"]["bfloat16"]
    assert report["ours"]["peak_dtype"] == "float32"
    assert report["bf16_speedup"] == pytest.approx(
        report["ours"]["seconds_per_step"] / bf16["seconds_per_step"]
    )
    assert check["max_diff"]["ours_bf16"] > 10 * check["max_diff"]["ours"]  # bf16 rounding
    assert report["config"]["preset"] == "tiny" and set(report["variants"]) == {"ours_bf16"}
    assert report["config"]["lora"] is None
    assert report["config"]["training"] == "full fine-tuning"
    check_flops(report, tmp_path / "work" / "assets" / "model")


def check_flops(report: dict, model_dir) -> None:
    """The FLOP columns of the tiny run: trl's executed count is the hand formula of its batch
    (4 rows of 24 tokens, no padding: causal attention, the head on all 4 x 23 positions, the
    reference live), trl_defaults adds one forward of the policy (gradient checkpointing); the
    necessary work is the same for every side and never above what a side executes; MFU and HFU
    are those rates over the run's best matmul peak of the side's dtype."""
    shape = flops.decoder_shape(AutoModelForCausalLM.from_pretrained(model_dir))
    preset = PRESETS["tiny"]
    rows, length = 2 * preset.batch_size, preset.prompt_tokens + preset.completion_tokens
    policy, reference = Pass(rows, length, False, True), Pass(rows, length, False, False)
    trl = flops.pass_work(shape, policy) + flops.pass_work(shape, reference)
    trl.head = flops.head_flops(shape, rows * (length - 1), 4 + 1)
    assert report["trl"]["flops_per_step"] == pytest.approx(trl.total, rel=1e-12)
    recompute = flops.pass_work(shape, Pass(rows, length, False, False)).total
    assert report["trl_defaults"]["flops_breakdown"]["recompute"] == pytest.approx(recompute)
    assert report["trl_defaults"]["peak_dtype"] == "bfloat16"
    peaks = report["peak_flops_per_s_by_dtype"]
    assert report["peak_flops_per_s"] == peaks["float32"] > 0 and peaks["bfloat16"] > 0
    necessary = {report[n]["model_flops_per_step"] for n in ("ours", "trl", "trl_defaults")}
    assert len(necessary) == 1
    every_run = [report[n] for n in ("ours", "trl", "trl_defaults")]
    every_run += list(report["variants"].values())  # each run measured the peaks: the best wins
    for name in ("ours", "trl", "trl_defaults"):
        side = report[name]
        assert side["peak_flops_per_s"] == peaks[side["peak_dtype"]]
        assert side["peak_flops_per_s"] == max(
            run["matmul_peak_flops_per_s"][side["peak_dtype"]] for run in every_run
        )
        assert side["model_flops_per_step"] <= side["flops_per_step"]
        timed = slice(preset.warmup, -1)  # the last step ran under the profiler
        executed = sum(s["total"] for s in side["step_flops"][timed])
        assert side["flops_per_s"] == pytest.approx(executed / sum(side["step_seconds"][timed]))
        assert side["hfu"] == pytest.approx(side["flops_per_s"] / side["peak_flops_per_s"])
        assert 0 < side["mfu"] <= side["hfu"] < 1.0  # a tiny model: far below the peak
    assert "matmul peak GFLOP/s" in bench_table(report)


@pytest.mark.slow
def test_lora_reaches_both_sides(tmp_path):
    """--lora: trl and ours each train the same adapter (and only it) from the shared initial
    adapter, with losses that agree; the report says LoRA was on."""
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    status = main(["--preset", "tiny", "--lora", "--workdir", str(work), "--json", str(out),
                   "--sides", "trl", "ours"])  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    spec = json.loads((work / "spec.json").read_text())
    assert spec["case"]["lora"] is True
    assert (work / "case" / "adapter_init" / "adapter_config.json").is_file()
    # rank 8 on q, k, v, o (32 -> 32), gate, up (32 -> 64) and down (64 -> 32), 4 layers
    adapter = 4 * (4 * 8 * (32 + 32) + 3 * 8 * (32 + 64))
    base = AutoModelForCausalLM.from_pretrained(work / "assets" / "model").num_parameters()
    for name in ("ours", "trl"):
        assert report[name]["trainable_parameters"] == adapter  # the adapter, and only it
        assert report[name]["parameters"] == base + adapter
        # the FLOP count's view: the adapters' multiply-adds per token are their weights
        shape = report[name]["decoder_shape"]
        assert shape["trainable_weights"] == shape["adapter_weights"] == adapter
        assert not shape["head_trainable"]
    assert report["loss_check"]["ok"]
    config = report["config"]
    assert config["lora"] == {"r": 8, "alpha": 16, "target_modules": "all-linear"}
    assert config["training"] == "LoRA r=8 alpha=16 all-linear"
    assert config["preset_settings"]["lora"] is True
    table = bench_table(report)
    assert "tiny: LoRA r=8 alpha=16 all-linear" in table
    assert f"ours {adapter:,} of" in table


def test_smollm2_preset():
    """The real-model preset: SmolLM2 from the model cache, hh-rlhf rows, batch 4, length 512."""
    preset = PRESETS["smollm2"]
    assert preset.model_source == "smollm2" and preset.model_source in MODEL_SOURCES
    assert preset.data == str(HH_RLHF_FILE)
    assert (preset.batch_size, preset.max_length, preset.warmup, preset.steps) == (4, 512, 1, 3)
    assert preset.threads == 2 and preset.learning_rate == 1e-5 and not preset.lora
    args = build_parser().parse_args(["--preset", "smollm2", "--lora"])
    assert resolve_preset(args).lora
    assert not resolve_preset(build_parser().parse_args(["--preset", "smollm2"])).lora
    case = bench_case(resolve_preset(args), "model-dir", HH_RLHF_FILE)
    assert case.lora and case.model_path == "model-dir"
    assert case.num_rows == 16 and case.max_length == 512 and case.learning_rate == 1e-5
    with pytest.raises(ValueError, match="model_source"):
        Preset("x", "unknown source", model_source="no-such-model")


def test_model_source_is_the_policy(tmp_path, monkeypatch):
    """A preset's model_source is fetched (here: a tiny model standing in for SmolLM2) and the
    workspace trains that directory; nothing is built from the preset's config. --model wins."""
    tiny = PRESETS["tiny"]
    _, built = prepare_assets(tiny, tmp_path / "built")
    model_dir = built.policy_dir
    fetched = []
    monkeypatch.setattr(
        "parity.bench.presets.fetch_smollm2", lambda cache: fetched.append(cache) or model_dir
    )
    preset = with_overrides(tiny, model_source="smollm2", lora=True)
    case, ws = prepare_assets(preset, tmp_path / "work")
    assert len(fetched) == 1
    assert case.model_path == str(model_dir) and ws.policy_dir == model_dir
    assert not (tmp_path / "work" / "assets" / "model").exists()
    assert case.lora and (ws.adapter_init_dir / "adapter_config.json").is_file()
    case, _ = prepare_assets(preset, tmp_path / "other", model=str(model_dir))
    assert len(fetched) == 1 and case.model_path == str(model_dir)


def test_smollm2_source_finds_the_cached_model(smollm2):
    """With SmolLM2 in the model cache (the fixture fetches it once), the source returns that
    directory without fetching again."""
    cached = default_cache_dir() / MODEL_NAME
    assert smollm2 == cached and is_model_dir(cached)
    stamp = (cached / "config.json").stat().st_mtime_ns
    assert MODEL_SOURCES["smollm2"]() == cached
    assert (cached / "config.json").stat().st_mtime_ns == stamp


def side(losses, seconds, exact=True):
    return summarize(
        {
            "losses": losses, "step_seconds": seconds, "step_completion_tokens": [100] * len(seconds),
            "exact": exact, "peak_rss_mb": 1000.0, "peak_cuda_mb": None, "setup_seconds": 1.0,
        },
        warmup=1,
    )  # fmt: skip


def test_summary_skips_warmup_and_takes_the_median():
    s = side([0.7] * 4, [9.0, 1.0, 3.0, 2.0])
    assert s["seconds_per_step"] == 2.0
    assert s["completion_tokens_per_second"] == pytest.approx(300 / 6.0)


def test_summary_leaves_out_a_profiled_step():
    raw = {"step_seconds": [9.0, 1.0, 3.0, 50.0], "step_completion_tokens": [100] * 4,
           "profile": [{"op": "aten::mm"}]}  # fmt: skip
    s = summarize(raw, warmup=1)
    assert s["seconds_per_step"] == 2.0
    assert s["completion_tokens_per_second"] == pytest.approx(200 / 4.0)


def test_flop_rates_over_the_timed_steps():
    """Mean FLOPs per timed step, rates Σ FLOPs / Σ seconds, utilisation against the best peak
    of the side's dtype over all runs."""
    work = [
        {"linear": 6.0, "attention": 1.0, "recompute": 0.0, "head": 3.0, "total": 10.0},
        {"linear": 12.0, "attention": 2.0, "recompute": 0.0, "head": 6.0, "total": 20.0},
        {"linear": 24.0, "attention": 4.0, "recompute": 0.0, "head": 12.0, "total": 40.0},
    ]
    raw = {"step_seconds": [9.0, 1.0, 4.0], "step_completion_tokens": [1] * 3, "step_flops": work,
           "step_model_flops": [5.0, 10.0, 30.0], "compute_dtype": "float32"}  # fmt: skip
    s = summarize(raw, warmup=1)
    assert s["flops_per_step"] == 30.0 and s["flops_breakdown"]["head"] == 9.0
    assert s["model_flops_per_step"] == 20.0
    assert s["flops_per_s"] == 60.0 / 5.0 and s["model_flops_per_s"] == 40.0 / 5.0
    peaks = matmul_peaks([{"matmul_peak_flops_per_s": {"float32": 20.0, "bfloat16": 50.0}},
                          {"matmul_peak_flops_per_s": {"float32": 24.0, "bfloat16": 40.0}}])  # fmt: skip
    assert peaks == {"float32": 24.0, "bfloat16": 50.0}
    rated = with_utilisation(s, peaks)
    assert rated["peak_dtype"] == "float32" and rated["peak_flops_per_s"] == 24.0
    assert rated["hfu"] == pytest.approx(12.0 / 24.0) and rated["mfu"] == pytest.approx(8.0 / 24.0)
    assert "mfu" not in with_utilisation(side([0.7], [1.0]), peaks)  # nothing counted


def test_disagreeing_losses_fail_loudly():
    sides = {
        "trl": side([0.69, 0.68], [1, 1]),
        "ours": side([0.69, 0.68 + 2e-5], [1, 1]),  # fast, and wrong by 2e-5 at step 2
        "trl_defaults": side([0.69, 0.67], [1, 1], exact=False),  # allowed to differ
    }
    check = loss_check(sides, tolerance=1e-5)
    assert not check["ok"]
    assert check["max_diff"]["ours"] == pytest.approx(2e-5)
    report = {"ours": sides["ours"], "trl": sides["trl"], "trl_defaults": sides["trl_defaults"],
              "variants": {}, "loss_check": check, "speedup": 1.0}  # fmt: skip
    assert "DISAGREE" in bench_table(report)
    sides["ours"]["losses"][1] = 0.68 + 5e-6
    assert loss_check(sides, tolerance=1e-5)["ok"]  # trl_defaults' 1e-2 does not count


def test_synthetic_rows_have_exact_token_counts():
    """BOS + 127 single-token words = 128 prompt tokens; 127 words + EOS = 128 per completion."""
    preset = PRESETS["cpu-small"]
    tokenizer = train_tokenizer(_random_word_corpus(2000, seed=0), vocab_size=2000)
    assert len(tokenizer) == 2000
    rows = synthetic_rows(preset, single_token_words(tokenizer), 3)
    tokenized = tokenize_rows(rows, tokenizer, max_length=None, truncation_mode="keep_start")
    for f in tokenized.rows:
        assert (len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) == (
            128,
            128,
            128,
        )
