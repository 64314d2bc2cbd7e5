"""Negative: BatchNormalization in training mode (batch statistics, running-stat outputs used)."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    inits = [_init("w", rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32))] + _bn_params(rng, "bn", 4)
    bn = helper.make_node("BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
                          ["y", "running_mean", "running_var"], name="bn", training_mode=1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn]
    outputs = [_value("y", [2, 4, 4, 4]), _value("running_mean", [4]), _value("running_var", [4])]
    return _model(nodes, [_value("x", [2, 3, 4, 4])], outputs, inits, "fold_bn_training")
