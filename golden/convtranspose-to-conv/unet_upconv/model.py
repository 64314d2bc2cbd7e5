"""A decoder: a U-Net up-convolution (kernel 2, stride 2, a Relu after it: the Relu moves before the
DepthToSpace), then a DCGAN-style one (kernel 4, stride 2, pads 1: a 3x3 Conv over the phases, 2.25x the MACs)
writing the graph output. Dynamic batch."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("up.w", (4, 3, 2, 2)), ("up.b", (3,)), ("head.w", (3, 2, 4, 4)))]
    nodes = [helper.make_node("ConvTranspose", ["x", "up.w", "up.b"], ["up"], name="up", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Relu", ["up"], ["act"], name="act"),
             helper.make_node("ConvTranspose", ["act", "head.w"], ["y"], name="head", kernel_shape=[4, 4],
                              strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
