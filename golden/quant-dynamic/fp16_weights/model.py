"""The transformer-style MLP of mlp_matmul in float16 (weights, computation and interface), as a model exported
in half precision is: its weights are quantized too, each DequantizeLinear's float32 output Cast to float16."""

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from golden.quant_dynamic_mlp import build as build_float32


def build() -> onnx.ModelProto:
    model = build_float32()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model
