"""A pre-norm attention input: LayerNorm whose scale makes channels 2 and 5 outliers (x40), read by the q and v
projections (MatMul + bias). smooth divides the LayerNorm's scale and bias by s and multiplies both weights' rows."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, 8)
    gamma[[2, 5]] *= 40
    inits = [numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1)]
    for name in ("q", "v"):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"{name}_b")]
        nodes += [helper.make_node("MatMul", ["n", f"{name}_w"], [f"{name}_mm"], name=f"{name}_proj"),
                  helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [name], name=f"{name}_bias")]
    nodes.append(helper.make_node("Add", ["q", "v"], ["y"], name="merge"))
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "smooth_qkv", [value("x", TensorProto.FLOAT, [2, 4, 8])],
                              [value("y", TensorProto.FLOAT, [2, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
