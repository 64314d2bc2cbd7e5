"""Negative: the Conv output is also read by a Relu, so its weights cannot change."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32))] + _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             _bn("bn", "c", "y"), helper.make_node("Relu", ["c"], ["r"], name="relu")]
    outputs = [_value("y", [1, 4, 4, 4]), _value("r", [1, 4, 4, 4])]
    return _model(nodes, [_value("x", [1, 3, 4, 4])], outputs, inits, "fold_bn_two_consumers")
