"""calibrate observes a value made from another by a pure rearrangement (Transpose, Reshape, ...) through that
other value: the same multiset of values has the same minimum, maximum and distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import numpy_helper

from golden._quant_blocks import Builder, attention
from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes.quant.calibrate import METADATA_KEY, permutation_sources


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
    assert sorted(ranges) == ["kt", "q", "swapped", "x", "y"]
    assert ranges["kt"] == ranges["swapped"] == ranges["q"]
    assert record.stats["observed"] == record.stats["tensors"] - 2
    stages = record.stats["seconds"]
    assert set(stages) == {"data", "session", "inference", "observe", "search"}
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= record.seconds
    if method == "minmax":  # the exact extremes of q, which the other two hold rearranged
        q = np.concatenate([b["x"] @ _weight() for b in batches])
        assert ranges["kt"] == pytest.approx([float(q.min()), float(q.max())], rel=1e-6)


def _weight() -> np.ndarray:
    return numpy_helper.to_array(next(t for t in _heads_chain().graph.initializer if t.name == "wq"))
