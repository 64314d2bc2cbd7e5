"""ConvTransposes the pass leaves alone: grouped; dilated; and a kernel-4 stride-2 pads-1 one over `max-macs=2`."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("grouped.w", (4, 2, 2, 2)), ("dilated.w", (4, 4, 2, 2)), ("wide.w", (4, 2, 4, 4)))]
    nodes = [helper.make_node("ConvTranspose", ["x", "grouped.w"], ["a"], name="grouped", strides=[2, 2], group=2),
             helper.make_node("ConvTranspose", ["x", "dilated.w"], ["c"], name="dilated", dilations=[2, 2]),
             helper.make_node("ConvTranspose", ["x", "wide.w"], ["d"], name="wide", strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    shapes = {"a": [1, 4, 6, 6], "c": [1, 4, 5, 5], "d": [1, 2, 6, 6]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    graph = helper.make_graph(nodes, "declines", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
