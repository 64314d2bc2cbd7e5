"""Reshape targets built at run time, as torch writes a.view(B, C, -1) with a dynamic batch:
Concat(Unsqueeze(Gather(Shape(a), 0)), [32, 16]), with a a conv output. Two convs' outputs are reshaped by the one
Concat, then transposed into MatMuls. The Shape is read for the batch only, so it locks nothing; each reshape gets
its channel entry rewritten (32 -> 16), the second through a copy of the shared Concat."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(41)

    def const(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [const("wa", 32, 3, 3, 3), const("wb", 32, 3, 3, 3), const("ma", 32, 8), const("mb", 32, 8),
             numpy_helper.from_array(np.array([0], np.int64), "batch_axis"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([32, 16], np.int64), "rest")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["a"], ["dims"], name="shape"),
             helper.make_node("Gather", ["dims", "zero"], ["n"], name="batch"),
             helper.make_node("Unsqueeze", ["n", "batch_axis"], ["n1"], name="batch_1d"),
             helper.make_node("Concat", ["n1", "rest"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["a", "target"], ["a3"], name="flat_a"),
             helper.make_node("Reshape", ["b", "target"], ["b3"], name="flat_b"),
             helper.make_node("Transpose", ["a3"], ["at"], name="tokens_a", perm=[0, 2, 1]),
             helper.make_node("Transpose", ["b3"], ["bt"], name="tokens_b", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["at", "ma"], ["ya"], name="proj_a"),
             helper.make_node("MatMul", ["bt", "mb"], ["yb"], name="proj_b"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "dynamic_reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
