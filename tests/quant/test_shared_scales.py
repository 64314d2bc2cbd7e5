"""Scales shared through data-movement ops: a quantized tensor made from another quantized tensor by
Reshape/Transpose alone gets the same scale, so ONNX Runtime moves integers instead of requantizing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes.quant.calibrate import METADATA_KEY


def attention_scores() -> onnx.ModelProto:
    """x @ W + b -> Reshape [1, 8, 2, 8] -> Transpose -> scores = q @ q^T: the Add's output and both MatMul
    inputs are quantized, joined by data movement only."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1, 8, 2, 8], np.int64), "heads")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["proj"]),
             helper.make_node("Reshape", ["proj", "heads"], ["split"]),
             helper.make_node("Transpose", ["split"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"])]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


# What a histogram method gives: the same values estimated from subsamples of two layouts differ a little.
RANGES = {"x": (-3.0, 3.0), "xw": (-9.0, 9.0), "proj": (-10.0, 11.0), "q": (-10.5, 10.0), "kt": (-9.5, 10.25),
          "scores": (-200.0, 300.0)}


def quantized() -> onnx.ModelProto:
    model = Model.from_proto(attention_scores())
    model.metadata[METADATA_KEY] = json.dumps({"method": "percentile", "ranges": RANGES})
    return optimize(model, "insert-qdq{profile=ort-cpu}").model.to_proto()


def q_scales(proto: onnx.ModelProto) -> dict[str, float]:
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}


def test_tensors_joined_by_data_movement_share_the_union_of_their_ranges():
    scales = q_scales(quantized())
    union = (11.0 - -10.5) / 255.0
    assert scales["proj"] == scales["q"] == scales["kt"] == np.float32(union)
    assert scales["x"] == np.float32(6.0 / 255.0)  # not joined to them: its own range


def test_onnx_runtime_moves_integers_through_the_reshape_and_transposes(tmp_path):
    path = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(quantized().SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    requantized = [n.name for n in graph.node if n.op_type == "QuantizeLinear"
                   and producers.get(n.input[0]) in ("Reshape", "Transpose")]
    assert requantized == []
    # Integers all the way: the one Q is the model input's, the projection is one QGemm with its bias between
    # Reshapes (passes/quant/bias_gemm.py), and the scores come out of the integer MatMul.
    assert [n.op_type for n in graph.node] == ["QuantizeLinear", "Reshape", "QGemm", "Reshape", "Reshape",
                                               "Transpose", "Transpose", "MatMulIntegerToFloat"]
