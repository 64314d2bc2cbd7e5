"""A token MLP read at its class token: x[N, 6, 8] -> MatMul (16) -> Relu -> Gather(axis 1, index 0) -> MatMul (5).
The Gather picks along the token axis, so the 16 hidden channels pass through it and half of them go."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(20)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gather", ["r", "first"], ["cls"], name="class_token", axis=1),
             helper.make_node("MatMul", ["cls", "w2"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "class_token", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.array(0, np.int64), "first"),
         numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
