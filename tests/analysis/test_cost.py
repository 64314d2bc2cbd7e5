"""Cost analysis: hand-computed MACs per rule, params, peak activation memory, symbolic dims."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.analysis.cost import Cost, matmul_macs, model_cost
from irtool.ir import Model
from irtool.passmanager import PassContext

F = TensorProto.FLOAT


def build(nodes, inputs, outputs, weights=(), opset=18) -> Model:
    """inputs/outputs: (name, shape) pairs; weights: name -> ndarray."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(weights).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return Model.from_proto(proto)


def w(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def macs_of(model: Model, node: str, input_shapes=None) -> int | None:
    report = model_cost(model, input_shapes)
    return {n.name: n.macs for n in report.per_node}[node]


# ----------------------------------------------------------------------------------------- conv
def conv_model(x_shape, w_shape, **attrs) -> Model:
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    return build([node], [("x", x_shape)], [("y", None)], {"w": w(*w_shape), "b": w(w_shape[0])})


def test_conv_macs_and_params():
    model = conv_model([1, 3, 32, 32], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    report = model_cost(model)
    assert report.total_macs == 1 * 8 * 32 * 32 * 3 * 9 == 221184
    assert report.total_params == 8 * 3 * 3 * 3 + 8
    assert report.weight_bytes == 4 * 224
    assert report.per_node[0].params == 224
    assert report.per_node[0].output_bytes == 8 * 32 * 32 * 4
    assert report.unknown_macs == [] and report.unsupported_ops == []


def test_conv_strided_without_padding():
    # 32x32, k3, stride 2, no pads -> 15x15 output
    assert macs_of(conv_model([1, 3, 32, 32], [8, 3, 3, 3], strides=[2, 2]), "conv") == 8 * 15 * 15 * 27


@pytest.mark.parametrize("groups, c_out, expected", [
    (4, 16, 1 * 16 * 16 * 16 * 2 * 9),   # grouped: C_in/groups = 2
    (8, 8, 1 * 8 * 16 * 16 * 1 * 9),     # depthwise
])
def test_grouped_and_depthwise_conv(groups, c_out, expected):
    model = conv_model([1, 8, 16, 16], [c_out, 8 // groups, 3, 3], pads=[1, 1, 1, 1], group=groups)
    assert macs_of(model, "conv") == expected


@pytest.mark.parametrize("w_shape, groups, expected", [
    ([4, 3, 2, 2], 1, 1 * 4 * 8 * 8 * 3 * 4),   # N·C_in·in spatial·(C_out/groups)·kernel
    ([4, 1, 3, 3], 2, 1 * 4 * 8 * 8 * 1 * 9),   # groups=2 -> C_out = 2
])
def test_conv_transpose(w_shape, groups, expected):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[2, 2], group=groups)
    model = build([node], [("x", [1, 4, 8, 8])], [("y", None)], {"w": w(*w_shape)})
    assert macs_of(model, "deconv") == expected


# ----------------------------------------------------------------------------------------- gemm / matmul
@pytest.mark.parametrize("a_shape, b_shape, attrs", [
    ([5, 7], [7, 3], {}),
    ([5, 7], [3, 7], {"transB": 1}),
    ([7, 5], [3, 7], {"transA": 1, "transB": 1}),
])
def test_gemm_honors_transposes(a_shape, b_shape, attrs):
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="gemm", **attrs)
    model = build([node], [("a", a_shape)], [("y", None)], {"b": w(*b_shape), "c": w(3)})
    assert macs_of(model, "gemm") == 5 * 3 * 7


def test_batched_matmul_attention_shapes():
    # 2 batches x 4 heads, seq 16, head dim 8: QK^T is 8 products of [16,8]x[8,16], AV of [16,16]x[16,8]
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"], name="qk"),
             helper.make_node("MatMul", ["s", "v"], ["o"], name="av")]
    model = build(nodes, [("q", [2, 4, 16, 8]), ("k", [2, 4, 8, 16]), ("v", [2, 4, 16, 8])], [("o", None)])
    assert macs_of(model, "qk") == (2 * 4) * 16 * 16 * 8 == 16384
    assert macs_of(model, "av") == (2 * 4) * 16 * 8 * 16 == 16384


@pytest.mark.parametrize("a, b, expected", [
    ([8], [8, 16], 8 * 16),                  # 1-D left operand is a row
    ([4, 16, 8], [8], 4 * 16 * 8),           # 1-D right operand is a column
    ([8], [8], 8),                            # dot product
    ([2, 1, 16, 8], [3, 8, 4], 2 * 3 * 16 * 8 * 4),   # broadcast batch dims
])
def test_matmul_numpy_rules(a, b, expected):
    assert matmul_macs(a, b) == expected
    assert np.matmul(np.ones(a), np.ones(b)).size * a[-1] == expected


# ----------------------------------------------------------------------------------------- per element
@pytest.mark.parametrize("op, attrs, extra, x_shape, expected", [
    ("Relu", {}, {}, [1, 8, 4, 4], 128),
    ("BatchNormalization", {}, {"s": w(8), "bb": w(8), "m": w(8), "v": w(8)}, [1, 8, 4, 4], 2 * 128),
    ("LayerNormalization", {"axis": -1}, {"s": w(10), "bb": w(10)}, [2, 10], 4 * 20),
    ("InstanceNormalization", {}, {"s": w(8), "bb": w(8)}, [1, 8, 4, 4], 4 * 128),
    ("Softmax", {"axis": -1}, {}, [2, 5], 3 * 10),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, [1, 2, 8, 8], 2 * 4 * 4 * 4),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, {}, [1, 2, 8, 8], 2 * 8 * 8 * 9),
    ("GlobalAveragePool", {}, {}, [1, 2, 8, 8], 128),
    ("Transpose", {"perm": [1, 0]}, {}, [2, 5], 0),
])
def test_per_element_rules(op, attrs, extra, x_shape, expected):
    node = helper.make_node(op, ["x", *extra], ["y"], name="n", **attrs)
    model = build([node], [("x", x_shape)], [("y", None)], extra)
    assert macs_of(model, "n") == expected


def test_reduce_counts_input_elements_and_add_broadcasts():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["r"], name="mean"),
             helper.make_node("Add", ["x", "bias"], ["y"], name="add")]
    model = build(nodes, [("x", [2, 5])], [("r", None), ("y", None)],
                  {"bias": w(5), "axes": np.array([1], np.int64)})
    assert macs_of(model, "mean") == 10
    assert macs_of(model, "add") == 10


# ----------------------------------------------------------------------------------------- whole-model facts
def test_peak_activation_keeps_values_until_last_consumer():
    # x(400 B) -> big(4000 B) -> small(40 B); side = x @ W3 (40 B); y = small + side
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["big"], name="n0"),
             helper.make_node("MatMul", ["big", "w2"], ["small"], name="n1"),
             helper.make_node("MatMul", ["x", "w3"], ["side"], name="n2"),
             helper.make_node("Add", ["small", "side"], ["y"], name="n3")]
    model = build(nodes, [("x", [1, 100])], [("y", None)],
                  {"w1": w(100, 1000), "w2": w(1000, 10), "w3": w(100, 10)})
    report = model_cost(model)
    # n1 runs with x (still needed by n2), big and small alive; weights are not activations
    assert report.peak_activation_bytes == 400 + 4000 + 40
    assert report.total_macs == 100 * 1000 + 1000 * 10 + 100 * 10 + 10


def test_values_computed_from_weights_alone_are_not_activations():
    """A quantized weight's DequantizeLinear (and a Reshape of its output) is folded or fused by a runtime: a
    float [1000, 10] weight must not count as a 40 kB activation, while the Q/DQ of the activation x does."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="wdq"),
             helper.make_node("Reshape", ["wd", "shape"], ["wr"], name="wr"),
             helper.make_node("MatMul", ["xd", "wr"], ["y"], name="mm")]
    model = build(nodes, [("x", [1, 1000])], [("y", None)],
                  {"s": np.float32(0.1), "z": np.uint8(0), "wq": np.ones((10, 1000), np.int8), "ws": np.float32(0.1),
                   "shape": np.array([1000, 10], np.int64)})
    # q holds x and xq, dq xq and xd: 5000 B; counted, wd and wr (40 kB each) made it 84 kB
    assert model_cost(model).peak_activation_bytes == 4000 + 1000


def test_symbolic_dims_resolved_via_input_shapes():
    model = conv_model(["N", 3, 32, 32], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    dynamic = model_cost(model)
    assert dynamic.unknown_macs == ["conv"] and dynamic.total_macs == 0
    fixed = model_cost(model, {"x": [2, 3, 32, 32]})
    assert fixed.unknown_macs == [] and fixed.total_macs == 2 * 221184
    assert fixed.peak_activation_bytes == 2 * (3 + 8) * 32 * 32 * 4


def test_analysis_uses_context_input_shapes_and_caches():
    model = conv_model(["N", 3, 32, 32], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    ctx = PassContext(input_shapes={"x": [4, 3, 32, 32]})
    report = ctx.analysis(Cost, model)
    assert report.total_macs == 4 * 221184
    assert ctx.analysis(Cost, model) is report


def test_nonzero_params():
    weights = np.zeros((8, 3, 3, 3), np.float32)
    weights[:4] = 1.0   # half of the output channels pruned to zero
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = build([node], [("x", [1, 3, 8, 8])], [("y", None)], {"w": weights})
    report = model_cost(model)
    assert (report.total_params, report.nonzero_params) == (216, 108)


def test_histogram_includes_subgraphs_and_control_flow_is_unknown():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("t", F, [2])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["e"], name="else_mul")], "else", [],
                               [helper.make_tensor_value_info("e", F, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["out"], name="if", then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", F, [2]),
                               helper.make_tensor_value_info("r", F, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    report = model_cost(Model.from_proto(proto))
    assert report.op_histogram == {"Add": 1, "If": 1, "Mul": 1, "Relu": 1}
    assert report.unknown_macs == ["if"]
    assert report.total_macs == 2


def test_unsupported_op_is_listed_and_to_dict_is_json_ready():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Einsum", ["r", "r"], ["y"], name="ein", equation="i,i->")]
    model = build(nodes, [("x", [4])], [("y", None)])
    report = model_cost(model)
    assert report.unsupported_ops == ["Einsum"]
    data = json.loads(json.dumps(report.to_dict()))
    assert list(data) == ["total_params", "nonzero_params", "weight_bytes", "total_macs",
                          "peak_activation_bytes", "per_node", "op_histogram", "unknown_macs",
                          "unsupported_ops"]
    assert [n["name"] for n in data["per_node"]] == ["relu", "ein"]
    assert data["per_node"][0] == {"name": "relu", "op": "Relu", "macs": 4, "params": 0, "output_bytes": 16}
