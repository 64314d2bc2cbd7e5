"""nn.Linear on a [batch, tokens, 8] sequence with both dims dynamic (MatMul + bias Add), then a MatMul without
bias: ort-cpu writes the first as one Gemm between Reshapes, the output shape taken from the input's leading
dims at run time (Shape end=-1, Concat), and quantizes the sum, not the MatMul's output."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 16)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((16, 4)) * 0.4).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["fc1"], name="fc1"),
             helper.make_node("Add", ["fc1", "b1"], ["fc1_bias"], name="fc1_bias"),
             helper.make_node("MatMul", ["fc1_bias", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
