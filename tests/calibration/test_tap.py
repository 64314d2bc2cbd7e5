"""The in-graph summaries of calibration (min, max, NaN flag and strided subsample computed inside ONNX
Runtime) must equal the numpy reference applied to the tensors tapped whole."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from golden._quant_blocks import residual
from irtool.calibration.tap import summarize, tap
from irtool.ir.model import Model

NAMES = ["x", "stem", "stem_relu", "conv1", "relu1", "conv2", "add", "y"]


def _batches(seed: int, count: int = 3, negative: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        out.append({"x": -np.abs(x) if negative else x})
    return out


@pytest.mark.parametrize("opset", [13, 17, 18])  # ReduceMin/Max take axes as an input from opset 18
@pytest.mark.parametrize("per_sample", [0, 16, 1 << 14])
def test_in_graph_summary_equals_the_numpy_reference(opset, per_sample):
    proto = residual()
    proto.opset_import[0].version = opset
    model = Model.from_proto(proto)
    batches = _batches(opset)
    whole = list(tap(model, NAMES, batches))
    summaries = list(tap(model, NAMES, batches, summary=per_sample))
    assert len(summaries) == len(batches)
    for got, raw in zip(summaries, whole, strict=True):
        for name in NAMES:
            want = summarize(raw[name], per_sample)
            assert (got[name].low, got[name].high, got[name].finite) == (want.low, want.high, want.finite), name
            if per_sample:
                np.testing.assert_array_equal(got[name].sample, want.sample)


def test_nan_produced_inside_the_model_is_flagged():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["log"]), helper.make_node("Relu", ["log"], ["y"])],
                              "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    (summary,) = list(tap(model, ["log"], _batches(1, count=1, negative=True), summary=0))
    assert summary["log"].finite is False
    (clean,) = list(tap(model, ["log"], [{"x": np.ones((1, 3, 8, 8), np.float32)}], summary=0))
    assert clean["log"].finite is True and clean["log"].low == clean["log"].high == 0.0
