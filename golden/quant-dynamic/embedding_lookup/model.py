"""A token embedding as torch exports nn.Embedding: Gather(E[50, 32], ids) on axis 0, then a Linear (MatMul)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    table = rng.normal(0, 1.0, (50, 32))
    table[1] *= 0.01  # a rare token's small row: its own scale keeps it on a fine grid
    inits = [numpy_helper.from_array(table.astype(np.float32), "embed"),
             numpy_helper.from_array(rng.normal(0, 0.2, (32, 48)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["tokens"], name="lookup", axis=0),
             helper.make_node("MatMul", ["tokens", "w"], ["y"], name="linear")]
    graph = helper.make_graph(nodes, "quant_dynamic_embedding",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
