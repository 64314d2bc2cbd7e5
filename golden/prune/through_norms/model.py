"""through-norms=true: MatMul -> LayerNormalization -> MatMul -> RMSNormalization -> MatMul on [2, 4, 16] tokens.
Both norms normalize over the channel axis, so without the option nothing is removed; with it each hidden layer
keeps half its channels, the norms' scale and bias are sliced and normalize over the kept channels. The exact
oracle (norms over the kept channels) is tests/prune/test_prune_through_norms.py; here the budget only bounds
the change (on a normal sample it is 2.9 at most, where outputs reach 3.8)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(21)

    def const(name, *shape, offset=0.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3 + offset).astype(np.float32), name)

    inits = [const("W1", 16, 32), const("g1", 32, offset=1.0), const("b1", 32), const("W2", 32, 24),
             const("g2", 24, offset=1.0), const("W3", 24, 8)]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("LayerNormalization", ["h1", "g1", "b1"], ["n1"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n1", "W2"], ["h2"], name="fc2"),
             helper.make_node("RMSNormalization", ["h2", "g2"], ["n2"], name="rms", axis=-1),
             helper.make_node("MatMul", ["n2", "W3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "through_norms",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
