"""A Shape reads a quantized activation (torch's legacy exporter with dynamic axes reads dims this way): ort-cpu
points the Shape at the QuantizeLinear output, so no DequantizeLinear is left in ONNX Runtime's graph to make a
float copy of the tensor for its dims."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 16)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Shape", ["h"], ["h_dims"], name="h_dims"),
             helper.make_node("MatMul", ["h", "w2"], ["g"], name="fc2"),
             helper.make_node("Reshape", ["g", "h_dims"], ["y"], name="back")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 8])
    graph = helper.make_graph(nodes, "shape_read", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
