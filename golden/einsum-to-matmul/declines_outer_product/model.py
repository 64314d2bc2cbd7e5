"""No contracted letter ("bi,bj->bij", an outer product per row): no MatMul to make, the Einsum stays."""

from onnx import TensorProto, helper


def build():
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="outer", equation="bi,bj->bij")
    graph = helper.make_graph([node], "outer", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                                                helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
