"""The GPU check's attention probe: which SDPA kernels prompt sharing's 4D mask runs on.

    python -m parity.gpu_check.attention_probe --device cuda --json attention.json
    python -m parity.gpu_check.attention_probe --device cpu --size tiny --json a.json   # dry run

Part of ``python -m parity.gpu_check``. Prompt sharing (``dpo_core.packing``) hands the model a
boolean (rows, 1, L, L) block mask, which FlashAttention cannot take: SDPA then runs the
memory-efficient kernel or falls back to the math one, while the plain path (causal, no mask
when nothing is padded) may run flash. For each batch shape (``fixed``: the ``gpu`` bench
preset's 8 pairs of 256 + 256 tokens; ``ragged``: lengths drawn up to those, so the plain rows
are padded and masked too), each precision (fp32, bf16 autocast) and each path (``PATHS``:
plain; shared, padding-free as ``training.fit`` runs it; shared_padded, one pair per row) it
runs forward + backward of ``token_logps`` with the default backends and with each backend
forced (``torch.nn.attention.sdpa_kernel``); the kernel that ran is read off the profiler's
``aten::_scaled_dot_product_*`` ops, a refused backend records torch's reasons. The verdict,
per shape and precision: the kernel of each path, seconds per step, and whether sharing is
still faster than the plain path under the kernel it gets (if not, the layout choice should
depend on the kernel: ``dpo_core.packing.packed_layout``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions
from dpo_core.logps import token_logps
from dpo_core.packing import packed_layout
from parity.bench.presets import PRESETS, QWEN2_05B


@dataclass(frozen=True)
class ProbeSize:
    """The model and batch of one probe size (``_sizes``), and the timed steps per run."""

    model: dict
    vocab_size: int
    pairs: int
    prompt_tokens: int
    completion_tokens: int
    reps: int


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query, as qwen2: SDPA's GQA path is part of the choice
    "max_position_embeddings": 256,
}


def _sizes() -> dict[str, ProbeSize]:
    gpu = PRESETS["gpu"]
    return {
        "gpu": ProbeSize(
            dict(QWEN2_05B),
            gpu.model_vocab_size,
            gpu.batch_size,
            gpu.prompt_tokens,
            gpu.completion_tokens,
            reps=3,
        ),
        "tiny": ProbeSize(TINY_LLAMA, 1000, 2, 12, 12, reps=1),
    }


def probe_model(size: ProbeSize, device: str) -> torch.nn.Module:
    """A seeded float32 model of the size's shape with SDPA attention, on ``device``."""
    kwargs = dict(size.model)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=size.vocab_size, **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    return model.train()


def probe_batch(size: ProbeSize, shape: str, device: str):
    """B pairs of random ids as a right-padded ``PreferenceBatch``. ``fixed``: every prompt and
    completion at the size's lengths (no padding); ``ragged``: prompts of 1/4..1x and
    completions of 1/8..1x those lengths."""
    g = torch.Generator().manual_seed(1)
    p_max, c_max, b = size.prompt_tokens, size.completion_tokens, size.pairs

    def draw(high: int, fraction: int) -> list[int]:
        if shape == "fixed":
            return [high] * b
        return torch.randint(max(1, high // fraction), high + 1, (b,), generator=g).tolist()

    prompts, chosen, rejected = draw(p_max, 4), draw(c_max, 8), draw(c_max, 8)
    rows = []
    for p, completions in ((prompts, chosen), (prompts, rejected)):
        rows += [(n, c) for n, c in zip(p, completions, strict=True)]
    length = max(p + c for p, c in rows)
    ids = torch.zeros(2 * b, length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    prompt_ids = [torch.randint(3, size.vocab_size, (p,), generator=g) for p in prompts]
    for i, (p, c) in enumerate(rows):
        ids[i, :p] = prompt_ids[i % b]
        ids[i, p : p + c] = torch.randint(3, size.vocab_size, (c,), generator=g)
        attention[i, : p + c] = 1
        completion[i, p : p + c] = 1
    return PreferenceBatch(ids, attention, completion).to(device)


# Profiler op names -> kernel, most specific first.
KERNEL_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash_cpu"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("_scaled_dot_product_attention_math", "math"),
)


def kernels_in(op_names) -> list[str]:
    """The SDPA kernels among profiler op names (sorted, each once)."""
    found = set()
    for name in op_names:
        label = next((label for op, label in KERNEL_OPS if op in name), None)
        if label:
            found.add(label)
    return sorted(found)


BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
# plain: each prompt forwarded twice; shared: prompt sharing, padding-free (training.fit's
# default); shared_padded: prompt sharing, one pair per row (--no-padding-free).
PATHS = ("plain", "shared", "shared_padded")


def _backend(name: str):
    """A context that forces one SDPA backend (``default``: torch's own choice)."""
    if name == "default":
        return contextlib.nullcontext()
    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def probe_run(model, batch, *, path: str, backend: str, precision: str, device: str, reps: int):
    """One (path, backend, precision): a record of the kernel that ran, the median seconds of
    forward + backward over ``reps`` after one warm-up and the peak CUDA memory, and the
    sequence log-probs; or a record of the error and torch's reasons when the backend refuses,
    and None."""
    options = LogpOptions(prompt_sharing=path != "plain", padding_free=path == "shared")

    def step(backward: bool = True) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with _backend(backend), torch.autocast(device, torch.bfloat16, precision == "bf16"):
            logps = token_logps(model, batch, options).row_sums()
            if backward:
                logps.sum().backward()
        return logps.detach().float().cpu()

    record = {"path": path, "backend": backend, "precision": precision}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                logps = step(backward=False)
            record["kernels"] = kernels_in(e.name for e in prof.events())
            step()  # warm-up
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            for _ in range(reps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                seconds.append(time.perf_counter() - start)
        except RuntimeError as exc:
            reasons = [str(w.message) for w in caught if "not used because" in str(w.message)]
            record.update(ok=False, error=str(exc).splitlines()[0], why=reasons)
            return record, None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    record.update(ok=True, seconds=statistics.median(seconds), peak_cuda_mb=peak)
    return record, logps


def _layout_info(model, batch) -> dict:
    """Whether ``dpo_core.packing`` shares prompts on this batch, and in what rows."""
    layout = packed_layout(model, batch, padding_free=True)
    info = {"rows": tuple(batch.input_ids.shape), "sharing_chosen": layout is not None}
    if layout is not None:
        info.update(packed_rows=layout.num_rows, packed_fills=list(layout.fills))
    return info


def path_verdict(runs: list[dict]) -> dict:
    """Of one shape and precision: the default kernel and seconds of the plain and shared
    paths (and shared_padded's seconds), sharing's speed-up over the plain path, and the shared
    path's seconds under every backend that took its mask."""
    by = {(r["path"], r["backend"]): r for r in runs if r["ok"]}
    plain, shared = by.get(("plain", "default")), by.get(("shared", "default"))
    padded = by.get(("shared_padded", "default"))
    verdict = {
        "plain_kernel": plain and plain["kernels"],
        "shared_kernel": shared and shared["kernels"],
        "plain_s": plain and plain["seconds"],
        "shared_s": shared and shared["seconds"],
        "shared_padded_s": padded and padded["seconds"],
        "shared_s_by_backend": {b: r["seconds"] for (p, b), r in by.items() if p == "shared"},
    }
    if plain and shared:
        verdict["speedup"] = plain["seconds"] / shared["seconds"]
        verdict["sharing_faster"] = verdict["speedup"] > 1.0
    return verdict


def attention(device: str, size_name: str, shapes: list[str]) -> dict:
    """Every (shape, precision, path, backend) run, and the verdicts (module docstring)."""
    size = _sizes()[size_name]
    model = probe_model(size, device)
    precisions = ["fp32", "bf16"]
    report = {"device": device, "size": size_name, "model": size.model, "shapes": {}}
    for shape in shapes:
        batch = probe_batch(size, shape, device)
        runs, verdicts = [], {}
        for precision in precisions:
            plain_logps, group = None, []
            for path in PATHS:
                for backend in BACKENDS:
                    record, logps = probe_run(
                        model, batch, path=path, backend=backend, precision=precision,
                        device=device, reps=size.reps,
                    )  # fmt: skip
                    if logps is not None:  # the first that ran is the plain path's default
                        plain_logps = logps if plain_logps is None else plain_logps
                        record["max_abs_diff_vs_plain"] = (logps - plain_logps).abs().max().item()
                    group.append(record)
            runs += group
            verdicts[precision] = path_verdict(group)
        report["shapes"][shape] = {
            "layout": _layout_info(model, batch),
            "runs": runs,
            "verdict": verdicts,
        }
    report["summary"] = attention_summary(report)
    return report


def attention_summary(report: dict) -> str:
    """One line: per shape and precision, the kernels and sharing's speed-up."""
    parts = []
    for shape, data in report["shapes"].items():
        for precision, v in data["verdict"].items():
            kernels = f"plain {_names(v['plain_kernel'])} / shared {_names(v['shared_kernel'])}"
            speed = f", sharing x{v['speedup']:.2f}" if "speedup" in v else ""
            parts.append(f"{shape} {precision}: {kernels}{speed}")
    return "; ".join(parts)


def _names(kernels: list[str] | None) -> str:
    return "+".join(kernels) if kernels else "?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity.gpu_check.attention_probe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="gpu", choices=["gpu", "tiny"])
    p.add_argument("--shapes", nargs="+", default=["fixed", "ragged"], choices=["fixed", "ragged"])
    p.add_argument("--json", type=pathlib.Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = attention(args.device, args.size, args.shapes)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
