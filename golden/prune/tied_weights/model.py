"""One 3x3 conv (weight, bias) and one shared per-channel bias Add applied twice, as an unrolled refinement loop
exports them: h1 = h0 + relu(conv(h0)) + b, h2 = h1 + relu(conv(h1)) + b. The two convs read one weight, so their
input and output channels are tied; the pruned weight stays one initializer that both read."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("stem.w", (8, 3, 3, 3)), ("update.w", (8, 8, 3, 3)), ("update.b", (8,)),
                                 ("shift", (1, 8, 1, 1)), ("head.w", (2, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "stem.w"], ["h0"], name="stem", pads=[1, 1, 1, 1])]
    for step in (1, 2):
        h = f"h{step - 1}"
        nodes += [helper.make_node("Conv", [h, "update.w", "update.b"], [f"u{step}"], name=f"update{step}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"u{step}"], [f"r{step}"], name=f"relu{step}"),
                  helper.make_node("Add", [h, f"r{step}"], [f"s{step}"], name=f"residual{step}"),
                  helper.make_node("Add", [f"s{step}", "shift"], [f"h{step}"], name=f"shift{step}")]
    nodes.append(helper.make_node("Conv", ["h2", "head.w"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "refine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
