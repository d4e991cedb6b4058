"""Lightning's precision names that run the forwards under autocast, and the dtype of each.

One table for every place that must match what Lightning does under ``--precision``: the
reference precomputation runs under the same autocast as training (``training.inputs.precompute``),
the optimizer is not fused under fp16 loss scaling (``training.run.module``), and the benchmark
counts FLOPs in the autocast dtype (``parity``).
"""

from __future__ import annotations

import torch

# Lightning's precision names (and their short aliases) that run the forwards under autocast.
AUTOCAST_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}
