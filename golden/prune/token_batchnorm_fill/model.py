"""A LeViT-style token layer with a zeros_like clean-up, as torch's legacy exporter writes them with a dynamic
batch: x [N, 5, 8] -> MatMul (16) -> Flatten(axis=2) to [N*5, 16] -> BatchNormalization -> Reshape back to Shape(h)
-> Where(IsNaN(b), ConstantOfShape(Shape(b)) of 0, b) -> Relu -> MatMul (4). The Flatten starts at the channel axis,
IsNaN passes channels through and the fill carries them, so half of the 16 go (before, the Flatten at axis 2 and the
IsNaN locked them)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build():
    rng = np.random.default_rng(22)

    def const(name, values):
        return numpy_helper.from_array(np.asarray(values), name)

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="linear"),
             helper.make_node("Flatten", ["h"], ["flat"], name="tokens", axis=2),
             helper.make_node("BatchNormalization", ["flat", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Shape", ["h"], ["shape"], name="shape"),
             helper.make_node("Reshape", ["bn", "shape"], ["b"], name="back"),
             helper.make_node("IsNaN", ["b"], ["nan"], name="isnan"),
             helper.make_node("Shape", ["b"], ["b_shape"], name="b_shape"),
             helper.make_node("ConstantOfShape", ["b_shape"], ["zeros"], name="zeros_like",
                              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("Where", ["nan", "zeros", "b"], ["clean"], name="clean"),
             helper.make_node("Relu", ["clean"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "token_batchnorm_fill", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])],
        [const("w1", rng.standard_normal((8, 16)).astype(np.float32)),
         const("scale", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
         const("bias", rng.normal(0, 0.1, 16).astype(np.float32)),
         const("mean", rng.normal(0, 0.1, 16).astype(np.float32)),
         const("var", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
         const("w2", rng.standard_normal((16, 4)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
