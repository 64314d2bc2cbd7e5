"""Grouped Conv (group=2): the output channel is still axis 0 of W."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = [_init("w", rng.normal(0, 0.3, (6, 2, 3, 3)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, 6).astype(np.float32))] + _bn_params(rng, "bn", 6)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
             _bn("bn", "c", "y")]
    return _model(nodes, [_value("x", [1, 4, 5, 5])], [_value("y", [1, 6, 5, 5])], inits, "fold_bn_grouped")
