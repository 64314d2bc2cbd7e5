"""calibrate observes a value made from another by a pure rearrangement (Transpose, Reshape, ...) through that
other value: the same multiset of values has the same minimum, maximum and distribution. The range of a monotone
function of an observed value (Sigmoid, SiLU, LeakyRelu) is computed from that value's range."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import numpy_helper

from golden._quant_blocks import Builder, attention, silu_c2f
from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes.quant.calibrate import METADATA_KEY, permutation_sources
from irtool.passes.quant.derived import silu_range
from tests.quant.ort_run import intermediate_values


def _heads_chain():
    """x -> MatMul q -> Reshape -> Transpose (swapped) -> MatMul with its own Transpose (kt): swapped and kt,
    both MatMul inputs, hold q's values rearranged."""
    b = Builder(21)
    q = b.node("MatMul", ["x", b.w("wq", 8, 8)], "q")
    heads = b.node("Reshape", [q, b.const("shape", [0, 4, 2, 4])], "heads")
    swapped = b.node("Transpose", [heads], "swapped", perm=[0, 2, 1, 3])
    b.node("MatMul", [swapped, b.node("Transpose", [swapped], "kt", perm=[0, 1, 3, 2])], "y")
    return b.model({"x": [2, 4, 8]}, "y", [2, 2, 4, 4])


def test_sources_walk_up_through_rearrangements_only():
    model = Model.from_proto(_heads_chain())
    assert permutation_sources(model, ["x", "q", "heads", "swapped", "kt", "y"]) == {
        "x": "x", "q": "q", "heads": "q", "swapped": "q", "kt": "q", "y": "y"}
    attn = Model.from_proto(attention())
    assert permutation_sources(attn, ["k", "kt", "scores", "probs"]) == {
        "k": "k", "kt": "k", "scores": "scores", "probs": "probs"}


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_a_rearranged_value_gets_its_source_range_from_one_observation(method):
    rng = np.random.default_rng(4)
    batches = [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(3)]
    result = optimize(_heads_chain(), f"calibrate{{method={method}}}", calibration_data=batches)
    ranges = json.loads(result.model.metadata[METADATA_KEY])["ranges"]
    (record,) = [r for r in result.records if r.name == "calibrate"]
    # y, a graph output nothing reads, is never quantized, so it is not observed either
    assert sorted(ranges) == ["heads", "kt", "q", "swapped", "x"]
    assert ranges["kt"] == ranges["swapped"] == ranges["heads"] == ranges["q"]
    assert record.stats["observed"] == record.stats["tensors"] - 3
    stages = record.stats["seconds"]
    assert set(stages) == {"data", "session", "inference", "observe", "search"}
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= record.seconds
    if method == "minmax":  # the exact extremes of q, which the other two hold rearranged
        q = np.concatenate([b["x"] @ _weight() for b in batches])
        assert ranges["kt"] == pytest.approx([float(q.min()), float(q.max())], rel=1e-6)


def _weight() -> np.ndarray:
    return numpy_helper.to_array(next(t for t in _heads_chain().graph.initializer if t.name == "wq"))


def test_sigmoid_silu_and_leaky_relu_ranges_follow_from_their_input_without_observing_them():
    """In x * Sigmoid(x) only x is observed; the Sigmoid's, the product's and a LeakyRelu's minmax ranges are
    computed from x's range, and equal the extremes the tensors take on the calibration data."""
    proto = silu_c2f()
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32) * 2} for _ in range(6)]
    result = optimize(proto, "calibrate{profile=ort-cpu}", calibration_data=batches)
    ranges = json.loads(result.model.metadata[METADATA_KEY])["ranges"]
    (record,) = result.records
    assert record.stats["derived"] == 4  # stem_sigmoid, stem_silu, m_act, gate
    assert record.stats["observed"] == record.stats["tensors"] - 4 - 2  # a and b (Split) share stem_silu's stats
    derived = ["stem_sigmoid", "stem_silu", "m_act", "gate"]
    actual = intermediate_values(proto, derived, batches)
    for name in derived:
        assert ranges[name] == pytest.approx([float(actual[name].min()), float(actual[name].max())], rel=1e-5,
                                             abs=1e-6), name
    assert ranges["a"] == ranges["b"] == ranges["stem_silu"]


@pytest.mark.parametrize("interval", [(-5.0, 3.0), (-1.0, 2.0), (-8.0, -2.0), (0.5, 4.0), (-1.2784645, -1.2784645)])
def test_silu_range_is_the_exact_image_of_an_interval(interval):
    x = np.linspace(*interval, 200001)
    y = x / (1.0 + np.exp(-x))
    assert silu_range(*interval) == pytest.approx((y.min(), y.max()), abs=1e-9)
