"""A transformer-style MLP: MatMul W1[64,128] + bias, Relu, MatMul W2[128,32] + bias, on [2, 4, 64] tokens."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.125, (64, 128)).astype(np.float32), "fc1_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 128).astype(np.float32), "fc1_b"),
             numpy_helper.from_array(rng.normal(0, 0.09, (128, 32)).astype(np.float32), "fc2_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "fc2_b")]
    nodes = [helper.make_node("MatMul", ["x", "fc1_w"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "fc1_b"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "fc2_w"], ["o"], name="fc2"),
             helper.make_node("Add", ["o", "fc2_b"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "quant_dynamic_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
