"""Gemm (transB=0, alpha, beta, bias C) followed by BatchNormalization over its columns."""

import numpy as np
import onnx
from onnx import helper

from golden._bn_blocks import _bn, _bn_params, _init, _model, _value


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [_init("B", rng.normal(0, 0.3, (5, 4)).astype(np.float32)),
             _init("C", rng.normal(0, 0.1, 4).astype(np.float32))] + _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", alpha=0.5, beta=2.0),
             _bn("bn", "g", "y")]
    return _model(nodes, [_value("x", [3, 5])], [_value("y", [3, 4])], inits, "fold_bn_gemm0")
