"""Negative: a Conv output plus a constant of shape [6], which broadcasts along the width, not the channels."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             _init("ramp", np.linspace(-1, 1, 6).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "ramp"], ["y"], name="add")]
    return _model(nodes, [_value("x", [1, 3, 6, 6])], [_value("y", [1, 4, 6, 6])], inits, "fold_bn_spatial_add")
