"""Two convs reading one zero bias, as dedup-initializers leaves them, in branches added at the end; the bias is
copied for the first conv before it is sliced (prune once sliced the shared tensor and broke the second conv)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(21)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "wa", "zeros"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["x", "wb", "zeros"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["ra", "wa2"], ["ya"], name="conv_a2"),
             helper.make_node("Conv", ["rb", "wb2"], ["yb"], name="conv_b2"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "shared_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 6])],
        [weight("wa", 8, 3, 3, 3), weight("wb", 8, 3, 3, 3), numpy_helper.from_array(np.zeros(8, np.float32), "zeros"),
         weight("wa2", 4, 8, 1, 1), weight("wb2", 4, 8, 1, 1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
