"""Conv without bias, stride 2, then two BatchNormalizations in a row: both fold."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [_init("w", rng.normal(0, 0.3, (5, 3, 3, 3)).astype(np.float32))]
    inits += _bn_params(rng, "bn1", 5) + _bn_params(rng, "bn2", 5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2]),
             _bn("bn1", "c", "m"), _bn("bn2", "m", "y", epsilon=1e-3)]
    return _model(nodes, [_value("x", [2, 3, 7, 7])], [_value("y", [2, 5, 3, 3])], inits, "fold_bn_chain")
