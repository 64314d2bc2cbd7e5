"""Div by 1.5 instead of sqrt(2): erf(x / 1.5) is not GELU, nothing is fused."""

from onnx import numpy_helper

from golden._quant_blocks import gelu_mlp


def build():
    model = gelu_mlp("torch")
    for tensor in model.graph.initializer:
        if tensor.name == "gelu.sqrt2":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 0 + 1.5, tensor.name))
    return model
