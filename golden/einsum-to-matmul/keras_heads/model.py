"""Keras MultiHeadAttention's projections as tf2onnx writes them: into heads "abc,cde->abde" (the [c, d, e]
weight becomes one [c, d*e] MatMul weight, the output is reshaped back to heads) and out of them "abcd,cde->abe"
(the two contracted letters c, d merge: the activation by a Reshape, the weight reshaped)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(5)
    w_in = numpy_helper.from_array(rng.standard_normal((8, 2, 3)).astype(np.float32), "w_in")
    w_out = numpy_helper.from_array(rng.standard_normal((2, 3, 8)).astype(np.float32), "w_out")
    nodes = [helper.make_node("Einsum", ["x", "w_in"], ["heads"], name="into_heads", equation="abc,cde->abde"),
             helper.make_node("Relu", ["heads"], ["act"], name="relu"),
             helper.make_node("Einsum", ["act", "w_out"], ["y"], name="out_of_heads", equation="abcd,cde->abe")]
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8])], [w_in, w_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
