"""Negative: the LayerNorm output also feeds a residual Add, which would see the smoothed (divided) values."""

import onnx

from golden.smooth.layernorm_qkv.model import build as build_qkv


def build() -> onnx.ModelProto:
    model = build_qkv()
    merge = next(n for n in model.graph.node if n.name == "merge")
    merge.input[1] = "n"  # y = q + n: a reader of the LayerNorm output that is not a MatMul
    return model
