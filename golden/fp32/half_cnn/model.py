"""fp16/conv_pool_gemm's CNN head as float16 converters write it: float16 weights and computation, the float32
input Cast to float16 first and the output Cast back to float32 last."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from golden.fp16.conv_pool_gemm.model import build as build_float32


def build() -> onnx.ModelProto:
    model = build_float32()
    graph = model.graph
    for tensor in graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in graph.node:
        node.input[:] = ["x16" if name == "x" else name for name in node.input]
        node.output[:] = ["y16" if name == "y" else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], name="in_cast", to=TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Cast", ["y16"], ["y"], name="out_cast", to=TensorProto.FLOAT))
    return model
