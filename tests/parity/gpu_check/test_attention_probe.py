"""parity.gpu_check.attention_probe: the SDPA kernel is read off the profiler's op names (the
probe itself runs in the dry run of ``test_cli.py``)."""

from __future__ import annotations

from parity.gpu_check.attention_probe import kernels_in


def test_kernels_are_read_off_the_profiler_op_names():
    names = [
        "aten::linear",
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::_scaled_dot_product_efficient_attention",
    ]
    assert kernels_in(names) == ["efficient", "flash_cpu", "math"]
    assert kernels_in(["aten::_scaled_dot_product_flash_attention"]) == ["flash"]
    assert kernels_in(["aten::mm"]) == []
