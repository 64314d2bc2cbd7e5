"""A ConvNeXt block's MLP on channels-last tokens: Linear, Relu, Linear, then its layer scale gamma [16] and the
residual Add. gamma goes into the second Linear's columns (weight and bias)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "fc1_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "fc1_b"),
             numpy_helper.from_array(rng.normal(0, 0.2, (32, 16)).astype(np.float32), "fc2_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "fc2_b"),
             numpy_helper.from_array(rng.uniform(0.05, 1.0, 16).astype(np.float32), "gamma")]
    nodes = [helper.make_node("MatMul", ["x", "fc1_w"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "fc1_b"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "fc2_w"], ["o"], name="fc2"),
             helper.make_node("Add", ["o", "fc2_b"], ["ob"], name="fc2_bias"),
             helper.make_node("Mul", ["gamma", "ob"], ["scaled"], name="layer_scale"),
             helper.make_node("Add", ["x", "scaled"], ["y"], name="residual")]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "layer_scale", [value("x", TensorProto.FLOAT, [1, 4, 4, 16])],
                              [value("y", TensorProto.FLOAT, [1, 4, 4, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
