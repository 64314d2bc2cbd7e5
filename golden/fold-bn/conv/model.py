"""Conv (with bias, padding) followed by BatchNormalization."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, 4).astype(np.float32))] + _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _bn("bn", "c", "y")]
    return _model(nodes, [_value("x", [1, 3, 6, 6])], [_value("y", [1, 4, 6, 6])], inits, "fold_bn_conv")
