"""Grouped ConvTranspose (group=2, W[C_in, C_out/g, k, k]) with bias, stride 2."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    # C_in = 4, group = 2, C_out/g = 3: C_out = 6, and output channel 3 is group 1's first column.
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, 6).astype(np.float32))] + _bn_params(rng, "bn", 6)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", group=2, strides=[2, 2]),
             _bn("bn", "c", "y")]
    return _model(nodes, [_value("x", [1, 4, 4, 4])], [_value("y", [1, 6, 9, 9])], inits, "fold_bn_deconv")
