"""Gemm (transB=1, B[M, K], no C) followed by BatchNormalization."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    inits = [_init("B", rng.normal(0, 0.3, (4, 5)).astype(np.float32))] + _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm", transB=1),
             _bn("bn", "g", "y")]
    return _model(nodes, [_value("x", [3, 5])], [_value("y", [3, 4])], inits, "fold_bn_gemm1")
