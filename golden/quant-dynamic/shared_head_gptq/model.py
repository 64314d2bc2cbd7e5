"""shared_head after gptq: the head's integers are E^T rounded gptq's way, some entries a step off the nearest, so
they do not lie within half a step of the table; insert-qdq's note `irtool.rounded_from` (a digest of the float
weight they were rounded from, E^T) tells quant-dynamic{op-types=[Gather]} they are the table's all the same, and
the lookup reads them instead of storing its own copy (quant-gptq on a tied LM stored the table twice)."""

import hashlib
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    table = rng.normal(0, 1.0, (50, 32)).astype(np.float32)
    table[3] *= 0.01  # a rare token's small row keeps its own scale on the head's grid too
    scale = (np.abs(table).max(axis=1) / 63).astype(np.float32)
    q = np.clip(np.rint(table.T / scale), -63, 63).astype(np.int8)  # [32, 50]: E^T
    off = rng.random(q.shape) < 0.05  # gptq's choice: one step away from the nearest for some weights
    q = np.where(off & (np.abs(q) < 63), q + np.where(table.T / scale > q, 1, -1), q).astype(np.int8)
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(q, "head_q"),
             numpy_helper.from_array(scale, "head_scale"), numpy_helper.from_array(np.zeros(50, np.int8), "head_zero")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["tokens"], name="lookup", axis=0),
             helper.make_node("Relu", ["tokens"], ["h"], name="act"),
             helper.make_node("DequantizeLinear", ["head_q", "head_scale", "head_zero"], ["head_w"], name="head_dq",
                              axis=1),
             helper.make_node("MatMul", ["h", "head_w"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "quant_dynamic_shared_head_gptq",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6, 50])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    digest = hashlib.sha256(np.ascontiguousarray(table.T).tobytes()).hexdigest()[:16]  # rewrite.values_digest
    helper.set_model_props(model, {"irtool.rounded_from": json.dumps({"head_q": digest})})
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
