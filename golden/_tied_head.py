"""A tied language-model head, as each torch exporter writes it: the embedding table E [300, 64] (75 KiB, above
fold-constants' SHARED_COPY_BYTES) read by the lookup Gather and, transposed, by the head MatMul. torch.export
writes MatMul(x, Transpose(E)); the legacy exporter folds the Transpose and stores E^T beside E."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, WIDTH = 300, 64


def _model(head_weight: str, extra_nodes: list, initializers: list, vocab: int) -> onnx.ModelProto:
    table = np.random.default_rng(0).standard_normal((vocab, WIDTH)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="lookup"),
             helper.make_node("Relu", ["x"], ["h"], name="act"),
             *extra_nodes,
             helper.make_node("MatMul", ["h", head_weight], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "tied_head", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, vocab])],
        [numpy_helper.from_array(table, "E"), *[init(table) for init in initializers]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def exported_by_dynamo(vocab: int = VOCAB) -> onnx.ModelProto:
    return _model("E_t", [helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0])], [], vocab)


def exported_by_legacy(vocab: int = VOCAB) -> onnx.ModelProto:
    return _model("E_t", [], [lambda table: numpy_helper.from_array(np.ascontiguousarray(table.T), "E_t")], vocab)
