"""A fused qkv projection split into q, k and v: the scores' scale goes into q's columns of the fused weight (the
first 8 of 24); k's and v's columns keep their values."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 24)) * 0.4).astype(np.float32), "wqkv"),
             numpy_helper.from_array(np.float32(8 ** -0.5), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv"),
             helper.make_node("Split", ["qkv"], ["q", "k", "v"], name="split", axis=-1, num_outputs=3),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"),
             helper.make_node("Mul", ["qk", "scale"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["probs"], name="probs", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"], name="ctx")]
    graph = helper.make_graph(nodes, "fused_qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
