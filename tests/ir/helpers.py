"""Small deterministic models for the IR tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def conv_proto(opset: int = 17, weight_elements_big: bool = True) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(4 filters, 3x3, pad 1) -> Relu -> y."""
    weight = np.arange(4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3)
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.array([0.5, -1, 2, 0], np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def add_proto(elements: int = 2048) -> onnx.ModelProto:
    """y = x + w with a weight large enough to go to external data."""
    weight = numpy_helper.from_array(np.arange(elements, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", F, [elements])],
                              [helper.make_tensor_value_info("y", F, [elements])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def if_proto() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("t", F, [2])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["e"], name="else_mul")], "else", [],
                               [helper.make_tensor_value_info("e", F, [2])])
    node = helper.make_node("If", ["c"], ["out"], name="if", then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph([node], "main", [helper.make_tensor_value_info("x", F, [2]),
                                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", F, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def loop_proto() -> onnx.ModelProto:
    """acc = x added to itself trip (=3) times; the body reads x from the outer scope."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
         helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="body_add")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, [2])])
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    node = helper.make_node("Loop", ["trip", "", "x"], ["acc"], name="loop", body=body)
    graph = helper.make_graph([node], "main", [helper.make_tensor_value_info("x", F, [2])],
                              [helper.make_tensor_value_info("acc", F, [2])], [trip])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def relu_chain(length: int) -> gs.Graph:
    """x -> Relu n0 -> v0 -> Relu n1 -> v1 ... built with graphsurgeon, in order."""
    current = gs.Variable("x", np.float32, [4])
    inputs, nodes = [current], []
    for i in range(length):
        out = gs.Variable(f"v{i}", np.float32, [4])
        nodes.append(gs.Node("Relu", f"n{i}", inputs=[current], outputs=[out]))
        current = out
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=[current], opset=17)
