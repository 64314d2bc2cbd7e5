"""A batch norm its exporter decomposed, after a Conv without bias: Mul by gamma/sigma ([C, 1, 1]), Add of
beta - mu * gamma / sigma ([1, C, 1, 1]), then Relu. Both fold into the Conv."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             _init("scale", rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)),
             _init("shift", rng.normal(0, 0.5, (1, 4, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "shift"], ["a"], name="bn_add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    return _model(nodes, [_value("x", [1, 3, 6, 6])], [_value("y", [1, 4, 6, 6])], inits, "fold_bn_decomposed")
