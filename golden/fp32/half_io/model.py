"""A float16 model with a float16 interface: x (float16) -> MatMul -> Add -> Softmax -> y (float16)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F16 = TensorProto.FLOAT16


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float16), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float16), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["a"], name="add"),
             helper.make_node("Softmax", ["a"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "half_io", [helper.make_tensor_value_info("x", F16, [2, 8])],
                              [helper.make_tensor_value_info("y", F16, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
