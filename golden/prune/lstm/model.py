"""A bidirectional LSTM with biases, peepholes and a constant initial state between two MatMuls: its 8 input
channels are W's columns, its 12 hidden units are rows of every gate and direction (W, R, B, P), R's columns and
the initial state's last axis; the output goes through Transpose and Reshape [5, 2, 2·12] into a MatMul."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(31)

    def const(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)

    inits = [const("w_in", 6, 8), const("W", 2, 48, 8), const("R", 2, 48, 12), const("B", 2, 96),
             const("h0", 2, 2, 12), const("c0", 2, 2, 12), const("P", 2, 36), const("w_out", 24, 4),
             numpy_helper.from_array(np.array([5, 2, 24], np.int64), "merged")]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["features"], name="embed"),
             helper.make_node("LSTM", ["features", "W", "R", "B", "", "h0", "c0", "P"], ["Y", "", ""], name="lstm",
                              hidden_size=12, direction="bidirectional"),
             helper.make_node("Transpose", ["Y"], ["Yt"], name="steps_first", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Yt", "merged"], ["hidden"], name="merge_directions"),
             helper.make_node("MatMul", ["hidden", "w_out"], ["y"], name="classify")]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
