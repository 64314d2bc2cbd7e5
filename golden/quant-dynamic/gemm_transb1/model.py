"""A Linear layer as exported by torch: Gemm(x, W[N=48, K=64], b) with transB=1, alpha 0.5; then Tanh."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.15, (48, 64))
    weight[5] *= 20.0  # one outlier output channel: per-channel scales keep the others fine
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 48).astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="linear", transB=1, alpha=0.5),
             helper.make_node("Tanh", ["g"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "quant_dynamic_gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
