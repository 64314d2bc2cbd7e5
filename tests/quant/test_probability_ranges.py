"""Softmax outputs keep their observed range under the clipping calibration methods: most probabilities sit near 0,
so a clipping threshold lands inside the tail of confident ones and saturates exactly those, and a histogram's
subsample holds few of them, so their extremes are reduced exactly (calibrate, irtool.calibration.tap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from golden._quant_blocks import Builder
from irtool.api import optimize
from irtool.passes.quant.calibrate import METADATA_KEY
from tests.quant.ort_run import intermediate_values


def attention_like():
    """x -> Linear -> Relu -> Linear -> Softmax over 64 -> Linear: peaked probabilities, a few near 1."""
    b = Builder(7)
    hidden = b.node("Relu", [b.node("MatMul", ["x", b.w("w1", 32, 64)], "h")], "h_relu")
    logits = b.node("MatMul", [hidden, b.w("w2", 64, 64, scale=1.5)], "logits")
    b.node("MatMul", [b.node("Softmax", [logits], "p", axis=-1), b.w("w3", 64, 16)], "y")
    return b.model({"x": [1, 16, 32]}, "y", [1, 16, 16])


def _batches():
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(32)]


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
def test_probabilities_keep_their_largest_value_where_other_tensors_are_clipped(method):
    """On this small model entropy clipped them before (0.998 for 1.0); the detector's probabilities below lost
    far more."""
    proto = attention_like()
    exact = intermediate_values(proto, ["p", "h_relu"], _batches())
    model = optimize(proto, f"calibrate{{method={method},profile=trt}}", calibration_data=_batches).model
    ranges = json.loads(model.metadata[METADATA_KEY])["ranges"]
    assert ranges["p"] == pytest.approx([0.0, float(exact["p"].max())], rel=1e-6)
    assert exact["p"].max() > 0.5 and np.mean(exact["p"] > 0.5) <= 1 / 64  # a tail: one value a row at most
    assert ranges["h_relu"][1] < float(exact["h_relu"].max())  # the method does clip the others


def test_the_trt_recipe_keeps_a_yolov8_heads_boxes():
    """`quant-trt` calibrates with entropy. Its DFL conv reads the box-distance probabilities: clipped (and their
    extremes taken from a subsample, 0.48 for 0.76), box coordinates came out 7.1 px off on average and 104 px at
    most on the 640x640 test detector; with their observed range, 0.53 and 9.4 px (run in ONNX Runtime, the
    only runtime here: TensorRT's own kernels were not run)."""
    from tests.quant.test_detector_decode import _images, held_out_errors, yolov8_export

    proto = yolov8_export()
    error, _ = held_out_errors(proto, optimize(proto, "quant-trt", calibration_data=_images(0, 16)).model.to_proto())
    assert error.mean() < 0.8 and error.max() < 12.0, (error.mean(), error.max())


def test_a_detectors_logits_keep_their_range_under_entropy():
    """`quant{method=entropy}` on the test detector: its head logits (read through Concat, Reshape and Split by
    the DFL Softmax and the score Sigmoid alone) were clipped like any activation, and scores came out 0.058 off
    on average, boxes 4.1 px; now 0.0014 and 2.8 px."""
    from tests.quant.test_detector_decode import _images, held_out_errors, yolov8_export

    proto = yolov8_export()
    quantized = optimize(proto, "quant{method=entropy}", calibration_data=_images(0, 16)).model.to_proto()
    boxes, scores = held_out_errors(proto, quantized)
    assert scores.mean() < 0.003 and boxes.mean() < 3.5, (scores.mean(), boxes.mean())
