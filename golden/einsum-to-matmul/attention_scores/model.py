"""Scaled attention written with torch.einsum: scores "bhqd,bhkd->bhqk" (k transposed into B'), Softmax, values
"bhqk,bhkd->bhqd" (already MatMul's layout: no Transpose). Dynamic batch."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    nodes = [helper.make_node("Einsum", ["q", "k"], ["scores"], name="scores", equation="bhqd,bhkd->bhqk"),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_mul"),
             helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
             helper.make_node("Einsum", ["probs", "v"], ["y"], name="values", equation="bhqk,bhkd->bhqd")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2, 5, 4]) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 5, 4])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
