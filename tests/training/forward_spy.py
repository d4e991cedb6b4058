"""``python -m tests.training.forward_spy ARGS``: ``python -m training.fit ARGS`` with every
log-prob forward of every process recorded, for tests of runs in child processes (FSDP2's
processes are children; Lightning relaunches this same module for each).

One JSON line per ``dpo_core.logps.scored_states`` call, in ``$DPO_FORWARD_SPY/rank<r>.jsonl``:
``grad`` (gradients on: a training forward), ``pairs``, ``rows`` (the packed rows, or null when
the plain forward ran) and ``calls`` (backbone calls it made). The load-time probes' forwards
(``in_probe``) are not recorded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import dpo_core.logps
import dpo_core.packing

ENV = "DPO_FORWARD_SPY"


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def in_probe() -> bool:
    """Whether a load-time probe is running: packing's verdict (``packing.probe_blocker``) or
    the own-logits guard (``model_checks.own_logits_check``), once per model, before training
    and on the whole model."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name in ("probe_blocker", "own_logits_check"):
            return True
        frame = frame.f_back
    return False


def install(out_dir: Path) -> None:
    """Wrap ``scored_states`` and ``pack_pairs`` to record into ``out_dir``."""
    real_states, real_pack = dpo_core.logps.scored_states, dpo_core.packing.pack_pairs
    current: dict = {}

    def pack_pairs(batch, layout=None):
        packed = real_pack(batch, layout)
        current["rows"] = packed.input_ids.shape[0]
        return packed

    def scored_states(model, parts, batch, options):
        if in_probe():
            return real_states(model, parts, batch, options)
        current.update(rows=None, calls=0)

        def count(*_):
            current["calls"] += not in_probe()

        hook = parts.backbone.register_forward_pre_hook(count)
        try:
            states = real_states(model, parts, batch, options)
        finally:
            hook.remove()
        record = dict(grad=torch.is_grad_enabled(), pairs=batch.num_pairs)
        record |= dict(rows=current["rows"], calls=current["calls"])
        with open(out_dir / f"rank{_rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return states

    dpo_core.logps.scored_states = scored_states
    dpo_core.packing.pack_pairs = pack_pairs


def read(out_dir: Path) -> dict[int, list[dict]]:
    """rank -> its records, in call order."""
    return {
        int(path.stem.removeprefix("rank")): [json.loads(line) for line in path.open()]
        for path in sorted(Path(out_dir).glob("rank*.jsonl"))
    }


if __name__ == "__main__":
    install(Path(os.environ[ENV]))
    from training.fit import main

    sys.exit(main(sys.argv[1:]))
