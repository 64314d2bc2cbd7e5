"""Two lateral maps resized to one size and added (an FPN top-down path, as torch.export writes F.interpolate with a
static shape): x [1, 8, 8, 8] -> Conv 8 -> c1; c1 -> Conv 12 stride 2 -> Resize(sizes [1, 12, 8, 8], linear) and
c1 -> Conv 12 stride 4 -> Resize(the same sizes constant) -> Add -> Conv 4. The 12 channels of the two laterals and the
Add are one group; prune keeps 6 of them (and 4 of the stem's 8), and each resize reads sizes [1, 6, 8, 8] from a
constant of its own (dedup-initializers merges the two)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(21)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c1"], name="stem", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["l2"], name="lateral2", kernel_shape=[1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["r1", "w4"], ["l4"], name="lateral4", kernel_shape=[1, 1], strides=[4, 4]),
             helper.make_node("Resize", ["l2", "", "", "sizes"], ["u2"], name="up2", mode="linear"),
             helper.make_node("Resize", ["l4", "", "", "sizes"], ["u4"], name="up4", mode="linear"),
             helper.make_node("Add", ["u2", "u4"], ["s"], name="merge"),
             helper.make_node("Conv", ["s", "wh"], ["y"], name="head", kernel_shape=[1, 1])]
    graph = helper.make_graph(
        nodes, "fpn_resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight("w0", (8, 8, 3, 3)), weight("w2", (12, 8, 1, 1)), weight("w4", (12, 8, 1, 1)),
         numpy_helper.from_array(np.array([1, 12, 8, 8], np.int64), "sizes"), weight("wh", (4, 12, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model
