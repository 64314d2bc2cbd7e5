"""A tied LM as torch.export writes it: the lookup Gather reads the table E [50, 32], the head MatMul reads it through
a Transpose. quant-dynamic{op-types=[Gather]} leaves the head float, which keeps E float: an int8 copy for the lookup
would only add bytes, so the table stays float and the model is unchanged (stat skipped_float_readers)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    table = np.random.default_rng(12).normal(0, 1.0, (50, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["tokens"], name="lookup", axis=0),
             helper.make_node("Relu", ["tokens"], ["h"], name="act"),
             helper.make_node("Transpose", ["embed"], ["embed_t"], name="tied", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "quant_dynamic_float_head_kept",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6, 50])],
                              [numpy_helper.from_array(table, "embed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
