"""Kernel 3, stride 2, pads 1 without output_padding: 2·5 − 1 = 9 rows and columns, no whole number of phases. The
Conv computes 5 per phase (10) and a Slice cuts the last row and column."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "up.w"),
             numpy_helper.from_array((rng.standard_normal(3) * 0.1).astype(np.float32), "up.b")]
    nodes = [helper.make_node("ConvTranspose", ["x", "up.w", "up.b"], ["y"], name="up", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 9, 9])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
