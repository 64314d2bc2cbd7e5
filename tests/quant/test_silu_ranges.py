"""A SiLU's input (read by its Sigmoid and the Mul alone) is calibrated only down to -T, where SiLU is within half
a step of its quantized output of 0 (passes/quant/derived.silu_tail): the tail below maps to outputs that round to
the same value, and the rest of the range gets finer steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from golden._quant_blocks import Builder
from irtool.api import optimize
from irtool.passes.quant.calibrate import METADATA_KEY
from irtool.passes.quant.derived import SILU_ARGMIN, silu_tail
from tests.quant.ort_run import intermediate_values


def _silu(x: float) -> float:
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("high", [0.5, 3.0, 10.0, 30.0])
def test_the_tail_starts_where_silu_is_half_an_output_step_from_zero(high):
    tail = silu_tail(high)
    half_step = (_silu(high) - _silu(SILU_ARGMIN)) / 255 / 2
    assert tail > -SILU_ARGMIN and abs(_silu(-tail)) == pytest.approx(half_step, rel=1e-6)
    below = -tail - np.linspace(0, 50, 1001)
    assert np.all(np.abs(_silu(below)) <= half_step * (1 + 1e-6))


def _silu_block():
    """conv a -> SiLU (Sigmoid, Mul); conv b -> SiLU and a residual Add that reads b too."""
    b = Builder(5)
    b.node("Mul", ["a", b.node("Sigmoid", [b.conv("x", "a", 3, 8, 1)], "a_sig")], "a_silu")
    b.node("Mul", ["b", b.node("Sigmoid", [b.conv("x", "b", 3, 8, 1)], "b_sig")], "b_silu")
    b.node("Add", ["b", "b_silu"], "b_sum")
    b.conv(b.node("Add", ["a_silu", "b_sum"], "sum"), "y", 8, 4, 1)
    return b.model({"x": [1, 3, 8, 8]}, "y", [1, 4, 8, 8])


def test_a_silu_input_is_ranged_down_to_its_tail_only():
    rng = np.random.default_rng(3)
    batches = [{"x": (rng.standard_normal((1, 3, 8, 8)) * 8).astype(np.float32)} for _ in range(6)]
    proto = _silu_block()
    ranges = json.loads(optimize(proto, "calibrate{profile=ort-cpu}", calibration_data=batches)
                        .model.metadata[METADATA_KEY])["ranges"]
    actual = intermediate_values(proto, ["a", "b"], batches)
    high = float(actual["a"].max())
    assert actual["a"].min() < -silu_tail(high) - 1  # the data go well past the cut
    assert ranges["a"] == pytest.approx([-silu_tail(high), high], rel=1e-5)
    assert ranges["b"] == pytest.approx([float(actual["b"].min()), float(actual["b"].max())], rel=1e-5)  # Add reads b
