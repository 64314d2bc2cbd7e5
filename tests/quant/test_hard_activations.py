"""ort-cpu spells HardSwish and HardSigmoid (MobileNetV3) with Mul, Add and Clip, so ONNX Runtime runs them on
integers (QLinearMul, QLinearAdd, the Clip folded into a Q) instead of as float islands between a DQ and a Q."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from golden._quant_blocks import Builder, hard_swish_se
from irtool.api import optimize
from irtool.passes.quant.calibrate import METADATA_KEY
from irtool.passes.quant.hard_activations import hard_sigmoid_range, hard_swish_range
from tests.quant.ort_run import intermediate_values, optimized_ops, run_batches


def _batches(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 3, 8, 8)) * 2).astype(np.float32)} for _ in range(count)]


def test_mobilenet_v3_block_runs_on_integers(tmp_path):
    proto = hard_swish_se()
    result = optimize(proto, "calibrate,insert-qdq", calibration_data=_batches(0, 16))
    assert result.records[-1].stats["hard_activations"] == 3
    path = str(tmp_path / "optimized.onnx")
    test = _batches(1, 8)
    reference, out = run_batches(proto, test), run_batches(result.model.to_proto(), test)
    ops = optimized_ops(result.model.to_proto(), path, test[:1])
    assert not {"HardSwish", "HardSigmoid", "Clip", "Mul", "Add"} & set(ops)
    # QLinearMul: 2 per HardSwish, 1 in the HardSigmoid, the gate's product; one QLinearAdd each; the input's Q
    assert ops["QLinearMul"] == 6 and ops["QLinearAdd"] == 3 and ops["QuantizeLinear"] == 1
    assert 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - out) ** 2)) > 30.0


def test_trt_and_unquantized_inputs_keep_the_ops():
    """TensorRT fuses them itself; and where the input is not quantized (here a graph input read by nothing
    quantized), four float ops would only be slower than one."""
    result = optimize(hard_swish_se(), "calibrate,insert-qdq{profile=trt}", calibration_data=_batches(0, 4))
    assert result.records[-1].stats["hard_activations"] == 0
    nodes = [helper.make_node("HardSwish", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    alone = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = optimize(alone, "calibrate,insert-qdq", calibration_data=_batches(0, 4))
    assert result.records[-1].stats["hard_activations"] == 0
    assert [n.op for n in result.model.graph.nodes] == ["HardSwish"]


@pytest.mark.parametrize("interval", [(-5.0, 4.0), (-2.0, -1.0), (-8.0, -3.5), (0.5, 6.0), (-1.5, -1.5)])
def test_ranges_are_the_exact_images_of_an_interval(interval):
    x = np.linspace(*interval, 200001)
    swish = x * np.clip(x / 6 + 0.5, 0, 1)
    assert hard_swish_range(*interval) == pytest.approx((swish.min(), swish.max()), abs=1e-9)
    sigmoid = np.clip(0.2 * x + 0.5, 0, 1)
    assert hard_sigmoid_range(*interval, 0.2, 0.5) == pytest.approx((sigmoid.min(), sigmoid.max()), abs=1e-9)


def test_calibrate_maps_their_ranges_from_the_input_without_observing_them():
    proto, batches = hard_swish_se(), _batches(2, 6)
    result = optimize(proto, "calibrate{profile=ort-cpu}", calibration_data=batches)
    assert result.records[-1].stats["derived"] == 3
    ranges = json.loads(result.model.metadata[METADATA_KEY])["ranges"]
    names = ["expand_act", "dw_act", "gate"]
    actual = intermediate_values(proto, names, batches)
    for name in names:
        values = actual[name]
        assert ranges[name] == pytest.approx([float(values.min()), float(values.max())], rel=1e-5, abs=1e-6), name


def _read_by_hard_activations() -> onnx.ModelProto:
    """conv a read only by a HardSigmoid (torch's alpha 1/6), conv b read by a HardSwish and by an Add."""
    b = Builder(4)
    gate = b.node("HardSigmoid", [b.conv("x", "a", 3, 8, 1)], "gate", alpha=1 / 6, beta=0.5)
    swish = b.node("HardSwish", [b.conv("x", "b", 3, 8, 1)], "swish")
    summed = b.node("Add", ["b", swish], "sum")
    b.conv(b.node("Mul", [gate, summed], "gated"), "y", 8, 4, 1)
    return b.model({"x": [1, 3, 8, 8]}, "y", [1, 4, 8, 8])


def test_a_tensor_only_they_read_is_ranged_where_they_are_not_constant():
    """Below -3 HardSwish is 0, and HardSigmoid is constant outside [-3, 3]: a range past that only coarsens the
    steps, so calibrate cuts it (exact). A tensor something else reads too (b) keeps its whole range."""
    batches = [{"x": b["x"] * 3} for b in _batches(2, 6)]
    for proto, cuts in ((hard_swish_se(), {"expand": (-3.0, np.inf), "dw": (-3.0, np.inf), "fc2": (-3.0, 3.0)}),
                        (_read_by_hard_activations(), {"a": (-3.0, 3.0), "b": (-np.inf, np.inf)})):
        result = optimize(proto, "calibrate{profile=ort-cpu}", calibration_data=batches)
        ranges = json.loads(result.model.metadata[METADATA_KEY])["ranges"]
        actual = intermediate_values(proto, list(cuts), batches)
        for name, (low, high) in cuts.items():
            values = actual[name]
            expected = [max(float(values.min()), low), min(float(values.max()), high)]
            assert ranges[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
        assert actual["expand" if "expand" in cuts else "a"].min() < -3.0  # the data does go past the cut
    assert actual["b"].min() < -3.0
