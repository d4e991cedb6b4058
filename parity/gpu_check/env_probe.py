"""The GPU check's first probe: the machine and the packages its stages import.

    python -m parity.gpu_check.env_probe --require-cuda --json env.json

Part of ``python -m parity.gpu_check``. It records Python, torch, CUDA, the GPU (name, capability,
memory, bf16), the float32 matmul settings (TF32 would loosen every float32 comparison) and the
packages the check needs, imported; it exits 1 when one is missing or, with ``--require-cuda``, when
torch sees no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import sys

import torch

# Everything the check's stages import beyond torch (import name = distribution name).
PACKAGES = (
    "transformers", "trl", "peft", "bitsandbytes", "datasets", "lightning", "accelerate",
    "jsonargparse", "pytest",
)  # fmt: skip


def _packages() -> tuple[dict[str, str | None], list[str]]:
    """Each package's version (None when it does not import) and what went wrong."""
    versions, problems = {}, []
    for module in PACKAGES:
        try:
            importlib.import_module(module)
            versions[module] = importlib.metadata.version(module)
        except Exception as exc:  # missing or broken: either way the stages that need it fail
            versions[module] = None
            problems.append(f"{module}: {type(exc).__name__}: {exc}".splitlines()[0])
    return versions, problems


def environment(require_cuda: bool) -> dict:
    """What the check runs on; ``problems`` lists what stops it."""
    versions, problems = _packages()
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "packages": versions,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            sdpa_enabled={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
        where = f"{props.name} (sm {props.major}{props.minor}, {info['gpu_memory_gib']} GiB)"
    else:
        where = f"CPU only ({os.cpu_count()} cores)"
        if require_cuda:
            problems.append("torch sees no CUDA device")
    info["problems"] = problems
    info["summary"] = f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}" + (
        f"; PROBLEMS: {'; '.join(problems)}" if problems else ""
    )
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity.gpu_check.env_probe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--require-cuda", action="store_true")
    p.add_argument("--json", type=pathlib.Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = environment(args.require_cuda)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(report["summary"])
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
