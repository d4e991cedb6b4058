"""Silence, one by one, the warnings a start prints that say nothing about the user's run.

Each is named by its exact text and its cause; anything else still shows.

- peft 0.21's ``PeftModel.__init__`` reads transformers 5's deprecated
  ``is_gradient_checkpointing`` (a ``FutureWarning`` at every LoRA start; our own code calls
  ``activation_checkpointing_enable``, the new name).
- Lightning 2.6 builds torch's deprecated ``LeafSpec`` (a ``FutureWarning`` at every fit).
- ``import peft`` imports bitsandbytes whenever it is installed, and bitsandbytes logs, on a CPU
  with AVX-512 BF16, that its optional ``kernels`` package for 4-bit matrix products is missing.
  That concerns 4-bit runs only, so it stays for ``--load-in-4bit``.
"""

from __future__ import annotations

import logging
import warnings

FOREIGN_FUTURE_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_NOTICE)


def quiet_foreign_warnings(load_in_4bit: bool) -> None:
    """Install the filters (module docstring); call before the model is loaded."""
    for message in FOREIGN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    notices = logging.getLogger(BNB_CPU_LOGGER)
    if load_in_4bit:
        notices.removeFilter(_not_kernels_notice)  # an earlier run in this process set it
    else:
        notices.addFilter(_not_kernels_notice)
