"""A HiFi-GAN-style 1-D upsampler: LeakyRelu, ConvTranspose1d (kernel 8, stride 4, pads 2), LeakyRelu. The second
LeakyRelu moves before the interleave (Reshape [N, C, 4, L], Transpose, Reshape [N, C, 4L]). Dynamic batch and
length."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 8)) * 0.3).astype(np.float32), "up.w"),
             numpy_helper.from_array((rng.standard_normal(3) * 0.1).astype(np.float32), "up.b")]
    nodes = [helper.make_node("LeakyRelu", ["x"], ["a"], name="pre_act", alpha=0.1),
             helper.make_node("ConvTranspose", ["a", "up.w", "up.b"], ["up"], name="up", kernel_shape=[8], strides=[4],
                              pads=[2, 2]),
             helper.make_node("LeakyRelu", ["up"], ["y"], name="post_act", alpha=0.1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "t"])]
    graph = helper.make_graph(nodes, "upsampler", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "t4"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
