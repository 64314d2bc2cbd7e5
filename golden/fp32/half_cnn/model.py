"""A float16 CNN head as float16 converters write it: the float32 input Cast to float16, Conv, Relu,
GlobalAveragePool, Flatten, Gemm (transB=1) in float16 with float16 weights, the output Cast back to float32."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F16 = TensorProto.FLOAT16


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float16), "conv_b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (5, 8)).astype(np.float16), "fc_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float16), "fc_b")]
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="in_cast", to=F16),
             helper.make_node("Conv", ["x16", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
             helper.make_node("Cast", ["logits"], ["y"], name="out_cast", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "half_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
