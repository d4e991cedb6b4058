"""Measure data preparation at scale, ours beside trl's ``DPOTrainer`` constructor.

Run (the table in ``BENCHMARKS.md``)::

    .venv/bin/python scripts/prep_bench.py --rows 10000 100000 \
        --model ~/.cache/dpo/models/SmolLM2-135M-Instruct

For each size it writes that many hh-rlhf-like rows (the real harmless-base rows of
``../shared/data/hh-rlhf``, repeated with a numbered first line so every row differs), then runs,
each in a fresh process: our whole 1-step run (``python -m training.fit --max-steps 1``) with an
empty cache, the same run again (the cache warm), our preparation alone, and trl's
``DPOTrainer`` constructor on the same rows (``dataset_num_proc`` as ours). Each line gives the
wall time, the process's peak RSS and the largest peak RSS of its finished child processes (the
``Dataset.map`` workers); ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages
HH_FILE = ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def write_rows(n: int, path: Path) -> Path:
    """``n`` hh-rlhf rows (implicit prompt), each made unique by a numbered first turn."""
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        base = [json.loads(line) for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            row = base[i % len(base)]
            tag = f"\n\nHuman: (conversation {i})"
            out.write(json.dumps({k: tag + v for k, v in row.items()}) + "\n")
    return path


def _child(kind: str, model: str, data: Path, work: Path, num_proc: int) -> None:
    """One measurement in this process; prints ``seconds`` and ``peak RSS``."""
    start = time.perf_counter()
    if kind == "prep":
        _our_preparation(model, data, work, num_proc)
    elif kind == "trl":
        _trl_constructor(model, data, work, num_proc)
    else:
        from training.fit import main

        out = work / f"run-{kind}"
        argv = ["--model", model, "--dataset", str(data), "--max-steps", "1", "--batch-size", "2"]
        argv += ["--output-dir", str(out), "--overwrite-output-dir", "--no-evaluate"]
        argv += ["--dataset-cache-dir", str(work / "cache"), "--dataset-num-proc", str(num_proc)]
        # --no-shuffle: every size trains the same first pairs (the 10k rows begin the 100k
        # file), so the peak RSS compares the data's memory, not two drawn batches' activations
        argv += ["--accelerator", "cpu", "--no-precompute-ref-log-probs", "--no-shuffle"]
        if main(argv) != 0:
            raise SystemExit(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    # the largest of its finished children: the dataset_num_proc workers of Dataset.map
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak, "worker_peak_rss_gib": workers}))


def _our_preparation(model: str, data: Path, work: Path, num_proc: int) -> None:
    import dataclasses

    from training.base.config import DataConfig
    from training.inputs.model_loading import load_tokenizer
    from training.inputs.prepared import prepare_source
    from training.inputs.prepared_parts import check_prepared, tokenized_part

    cfg = dataclasses.replace(
        DataConfig(), dataset_cache_dir=str(work / "prep-cache"), dataset_num_proc=num_proc
    )
    checked = check_prepared(
        prepare_source(data, "train", load_tokenizer(model), cfg), skip_invalid=False
    )
    tokenized_part(checked, range(checked.num_valid), "train", skip_invalid=False)


def _trl_constructor(model: str, data: Path, work: Path, num_proc: int) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model)
    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    args = DPOConfig(
        output_dir=str(work / "trl"),
        max_length=1024,
        dataset_num_proc=num_proc,
        report_to=[],
        bf16=False,
        use_cpu=True,
    )
    DPOTrainer(model=policy, args=args, train_dataset=rows, processing_class=tokenizer)


def _measure(kind: str, model: str, data: Path, work: Path, num_proc: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    command += ["--model", model, "--data", str(data), "--work", str(work)]
    command += ["--num-proc", str(num_proc)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--model", default=str(Path.home() / ".cache/dpo/models/SmolLM2-135M-Instruct")
    )
    parser.add_argument("--num-proc", type=int, default=None, help="default: the usable cores")
    parser.add_argument("--sides", nargs="+", default=["ours", "again", "prep", "trl"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from training.inputs.prepared import usable_cores

    num_proc = args.num_proc or usable_cores()
    if args.child:
        _child(args.child, args.model, args.data, args.work, num_proc)
        return 0
    results = []
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
            work = Path(tmp)
            data = write_rows(n, work / f"rows-{n}.jsonl")
            for side in args.sides:  # "ours" then "again": the second run finds the cache
                result = {
                    "rows": n,
                    "side": side,
                    **_measure(side, args.model, data, work, num_proc),
                }
                print(
                    f"{n:>9} rows  {side:<6} {result['seconds']:8.1f} s  "
                    f"peak RSS {result['peak_rss_gib']:.2f} GiB "
                    f"(largest worker {result['worker_peak_rss_gib']:.2f} GiB)",
                    flush=True,
                )
                results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
