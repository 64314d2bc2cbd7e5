"""`cleanup` on a small exported-looking CNN (BatchNormalization stays: cleanup is exact)."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    """A small CNN as exporters leave it: computed weights, Identity/Dropout/Cast no-ops, a shape computed
    with Shape/Gather/Concat, a dead branch, duplicate biases and a BatchNormalization."""
    rng = np.random.default_rng(10)
    inits = [
        _init("w_raw", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
        _init("w_scale", np.array([0.5], np.float32)),
        _init("b1", np.full(8, 0.1, np.float32)),
        _init("w2", rng.normal(0, 0.2, (8, 8, 1, 1)).astype(np.float32)),
        _init("b2", np.full(8, 0.1, np.float32)),
        _init("zero", np.array([0], np.int64)),
        _init("minus_one", np.array([-1], np.int64)),
        _init("fc_w", rng.normal(0, 0.1, (8 * 4 * 4, 10)).astype(np.float32)),
        _init("fc_w_copy", np.zeros((3,), np.float32)),
    ] + _bn_params(rng, "bn", 8)
    nodes = [
        helper.make_node("Mul", ["w_raw", "w_scale"], ["w1"], name="scale_weights"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c1"], ["c1_id"], name="id1"),
        _bn("bn", "c1_id", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Dropout", ["r1"], ["d1"], name="drop1"),
        helper.make_node("Conv", ["d1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("Cast", ["c2"], ["c2f"], name="cast_same", to=TensorProto.FLOAT),
        helper.make_node("Sigmoid", ["c2f"], ["dead"], name="dead_branch"),
        helper.make_node("Shape", ["c2f"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["c2f", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc"),
        helper.make_node("Identity", ["logits"], ["y"], name="out_id"),
    ]
    return _model(nodes, [_value("x", [1, 3, 8, 8])], [_value("y", [1, 10])], inits, "cleanup_cnn")
