"""fold-scale: scalar Mul/Div folded into the weights of the layer that makes its input (attention scales)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize

TOKENS, HEADS, HEAD = 5, 2, 4
WIDTH = HEADS * HEAD


class _Graph:
    def __init__(self, seed: int = 0):
        self.rng, self.nodes, self.inits = np.random.default_rng(seed), [], []

    def const(self, name: str, values) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x: str, name: str, width: int = WIDTH, weight: str | None = None) -> str:
        w = weight or self.const(f"{name}.w", (self.rng.standard_normal((WIDTH, width)) * 0.4).astype(np.float32))
        b = self.const(f"{name}.b", self.rng.standard_normal(width).astype(np.float32))
        return self.node("Add", [self.node("MatMul", [x, w], f"{name}.mm"), b], name)

    def heads(self, x: str, name: str, perm: list[int]) -> str:
        shape = self.const(f"{name}.shape", np.array([0, TOKENS, HEADS, HEAD], np.int64))
        return self.node("Transpose", [self.node("Reshape", [x, shape], f"{name}.split")], f"{name}.t", perm=perm)

    def model(self, out: str, extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (out, *extra_outputs)]
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  ["n", TOKENS, WIDTH])],
                                  outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def attention(scale: str = "mul", value: float = HEAD ** -0.5) -> onnx.ModelProto:
    """q/k/v projections, heads split by Reshape + Transpose, scores scaled as `scale` says, softmax, values,
    output projection."""
    g = _Graph()
    q = g.heads(g.linear("x", "q"), "qh", [0, 2, 1, 3])
    kt = g.heads(g.linear("x", "k"), "kh", [0, 2, 3, 1])
    v = g.heads(g.linear("x", "v"), "vh", [0, 2, 1, 3])
    if scale == "sdpa":  # torch's scaled_dot_product_attention export: both operands by value ** 0.5
        root = g.const("root", np.float32(value ** 0.5))
        q, kt = g.node("Mul", [q, root], "q_scaled"), g.node("Mul", [root, kt], "k_scaled")
    scores = g.node("MatMul", [q, kt], "scores")
    if scale == "mul":
        scores = g.node("Mul", [scores, g.const("scale", np.float32(value))], "scaled")
    elif scale == "div":
        scores = g.node("Div", [scores, g.const("scale", np.array([1 / value], np.float32))], "scaled")
    probs = g.node("Softmax", [scores], "probs", axis=-1)
    context = g.node("Transpose", [g.node("MatMul", [probs, v], "context")], "context.t", perm=[0, 2, 1, 3])
    merged = g.node("Reshape", [context, g.const("merge", np.array([0, TOKENS, WIDTH], np.int64))], "merged")
    return g.model(g.linear(merged, "proj"))


def _run(proto: onnx.ModelProto, batch: int = 3) -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((batch, TOKENS, WIDTH)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _fold(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    result = optimize(proto, "fold-scale")
    return result.model.to_proto(), next(r for r in result.records if r.name == "fold-scale").stats["folded"]


@pytest.mark.parametrize("scale, value, folds", [
    ("mul", 0.5, 1),            # 1/sqrt(4): a power of two, so the fold is exact
    ("div", 3 ** -0.5, 1),      # Div by sqrt(3): rounded once instead of twice
    ("sdpa", 0.5, 2),           # q and k^T each by 0.5 ** 0.5
])
def test_attention_scales_go_into_the_projection_weights(scale, value, folds):
    proto = attention(scale, value)
    folded, count = _fold(proto)
    assert count == folds
    ops = [n.op_type for n in folded.graph.node]
    assert "Mul" not in ops and "Div" not in ops and ops.count("MatMul") == 6
    reference, out = _run(proto), _run(folded)
    if value == 0.5 and scale == "mul":
        np.testing.assert_array_equal(out, reference)
    else:
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(folded, batch=1), _run(proto, batch=1), rtol=1e-5, atol=1e-5)


def test_a_shared_weight_keeps_its_values_for_the_other_layer():
    g = _Graph(1)
    shared = g.const("shared.w", (g.rng.standard_normal((WIDTH, WIDTH)) * 0.4).astype(np.float32))
    a = g.node("Mul", [g.linear("x", "a", weight=shared), g.const("two", np.float32(2.0))], "a2")
    b = g.linear("x", "b", weight=shared)
    proto = g.model(g.node("Add", [a, b], "y"))
    folded, count = _fold(proto)
    assert count == 1
    np.testing.assert_array_equal(_run(folded), _run(proto))


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_conv_and_gemm_take_the_scale_in_weight_and_bias(op):
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (
        ("w", (4, 3, 3, 3) if op == "Conv" else (6, 4)), ("b", (4,)))]
    inits.append(numpy_helper.from_array(np.float32(4.0), "c"))
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {}
    shape = [1, 3, 6, 6] if op == "Conv" else [2, 6]
    nodes = [helper.make_node(op, ["x", "w", "b"], ["h"], **attrs), helper.make_node("Div", ["h", "c"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, count = _fold(proto)
    assert count == 1 and [n.op_type for n in folded.graph.node] == [op, "Relu"]
    x = rng.standard_normal(shape).astype(np.float32)
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (proto, folded)]
    np.testing.assert_array_equal(runs[1], runs[0])  # 1/4: exact


def _declined(g: _Graph, out: str, extra_outputs: tuple[str, ...] = ()) -> None:
    proto = g.model(out, extra_outputs)
    folded, count = _fold(proto)
    assert count == 0
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in proto.graph.node]


def _fused_qkv(g: _Graph, picker: str) -> tuple[str, str, str]:
    """q, k and v picked out of one [n, tokens, 3 * width] projection, each [n, tokens, width]."""
    qkv = g.linear("x", "qkv", width=3 * WIDTH)
    if picker == "split":  # torch.chunk / legacy unbind
        g.nodes.append(helper.make_node("Split", [qkv], ["q", "k", "v"], name="split", axis=-1))
        return "q", "k", "v"
    if picker == "slice":  # the dynamo exporter's unbind: one Slice per part, then Squeeze
        parts = g.node("Reshape", [qkv, g.const("parts.shape", np.array([0, TOKENS, 3, WIDTH], np.int64))], "parts")
        picked = []
        for i, name in enumerate("qkv"):
            cut = g.node("Slice", [parts, g.const(f"{name}.0", np.array([i], np.int64)),
                                   g.const(f"{name}.1", np.array([i + 1], np.int64)),
                                   g.const(f"{name}.axis", np.array([2], np.int64))], f"{name}.cut")
            picked.append(g.node("Squeeze", [cut, g.const(f"{name}.sq", np.array([2], np.int64))], name))
        return tuple(picked)
    # nn.MultiheadAttention's legacy export: parts first, then a scalar Gather per part
    parts = g.node("Reshape", [qkv, g.const("parts.shape", np.array([0, TOKENS, 3, WIDTH], np.int64))], "parts")
    first = g.node("Transpose", [parts], "parts.t", perm=[2, 0, 1, 3])
    return tuple(g.node("Gather", [first, g.const(f"{name}.i", np.array(i, np.int64))], name, axis=0)
                 for i, name in enumerate("qkv"))


def _fused_attention(picker: str, scale: str, value: float = 3 ** -0.5) -> onnx.ModelProto:
    g = _Graph(3)
    q, k, v = _fused_qkv(g, picker)
    q, kt = g.heads(q, "qh", [0, 2, 1, 3]), g.heads(k, "kh", [0, 2, 3, 1])
    if scale == "sdpa":
        root = g.const("root", np.float32(value ** 0.5))
        q, kt = g.node("Mul", [q, root], "q_scaled"), g.node("Mul", [root, kt], "k_scaled")
    scores = g.node("MatMul", [q, kt], "scores")
    if scale == "mul":
        scores = g.node("Mul", [scores, g.const("scale", np.float32(value))], "scaled")
    probs = g.node("Softmax", [scores], "probs", axis=-1)
    context = g.node("MatMul", [probs, g.heads(v, "vh", [0, 2, 1, 3])], "context")
    merged = g.node("Reshape", [g.node("Transpose", [context], "context.t", perm=[0, 2, 1, 3]),
                                g.const("merge", np.array([0, TOKENS, WIDTH], np.int64))], "merged")
    return g.model(g.linear(merged, "proj"))


def _weights(proto: onnx.ModelProto, prefix: str) -> list[np.ndarray]:
    """The MatMul weight and bias of the layer named `prefix`, as the graph now reads them."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    mm = next(n for n in proto.graph.node if n.output[0] == f"{prefix}.mm")
    add = next(n for n in proto.graph.node if n.input[0] == mm.output[0])
    return [inits[mm.input[1]], inits[add.input[1]]]


@pytest.mark.parametrize("picker", ["split", "slice", "gather"])
@pytest.mark.parametrize("scale, folds", [("mul", 1), ("sdpa", 2)])
def test_a_fused_qkv_projection_takes_the_scale_in_its_q_and_k_columns_only(picker, scale, folds):
    """The scale lands on q's columns of the fused weight and bias (both of SDPA's d^-1/4: q's and k's), v's
    columns keep their values, and the model computes what it did, at two batch sizes (the batch is dynamic)."""
    proto = _fused_attention(picker, scale)
    folded, count = _fold(proto)
    assert count == folds and "Mul" not in [n.op_type for n in folded.graph.node]
    (w0, b0), (w1, b1) = _weights(proto, "qkv"), _weights(folded, "qkv")
    value = float(np.float32(3 ** -0.5)) if scale == "mul" else float(np.float32((3 ** -0.5) ** 0.5))
    factors = {"mul": [value, 1.0, 1.0], "sdpa": [value, value, 1.0]}[scale]
    for part, factor in enumerate(factors):
        cols = slice(part * WIDTH, (part + 1) * WIDTH)
        np.testing.assert_array_equal(w1[:, cols], (w0[:, cols].astype(np.float64) * factor).astype(np.float32))
        np.testing.assert_array_equal(b1[cols], (b0[cols].astype(np.float64) * factor).astype(np.float32))
    for batch in (3, 1):
        np.testing.assert_allclose(_run(folded, batch), _run(proto, batch), rtol=1e-5, atol=1e-5)


def test_a_fused_gemm_takes_the_scale_in_the_rows_of_its_transposed_weight():
    """Gemm with transB: the output's columns are the weight's rows."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((9, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(9).astype(np.float32), "b"),
             numpy_helper.from_array(np.float32(0.3), "c"), numpy_helper.from_array(np.array([3, 6]), "sizes")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Split", ["h", "sizes"], ["a", "rest"], axis=1),
             helper.make_node("Mul", ["a", "c"], ["a3"]), helper.make_node("Concat", ["a3", "rest"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    folded, count = _fold(proto)
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["Gemm", "Split", "Concat"]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (proto, folded)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6, atol=1e-6)


def test_a_pick_that_depends_on_a_dynamic_dim_waits_for_input_shapes(caplog):
    """The heads' Reshape bakes the token count the export ran with (as torch's legacy nn.MultiheadAttention export
    does) while the input's token dim is dynamic: at the stand-in sizes the way cannot be traced, so the scale
    stays, and the log says why; with the dims fixed (--input-shape) it folds."""
    proto = _fused_attention("split", "mul")
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "t"
    with caplog.at_level("INFO", logger="irtool.passes.fold_scale"):
        assert _fold(proto)[1] == 0
    assert "--input-shape" in caplog.text and "qkv" in caplog.text
    result = optimize(proto, "fold-scale", input_shapes={"x": [2, TOKENS, WIDTH]})
    assert next(r for r in result.records if r.name == "fold-scale").stats["folded"] == 1
    np.testing.assert_allclose(_run(result.model.to_proto(), 2), _run(proto, 2), rtol=1e-5, atol=1e-5)


def test_overlapping_slices_of_a_fused_projection_are_not_scaled():
    """q's columns are k's too: scaling them would scale k."""
    g = _Graph()
    qkv = g.linear("x", "qkv", width=2 * WIDTH)
    bounds = {"q": (0, WIDTH), "k": (WIDTH // 2, 2 * WIDTH)}
    cut = {n: g.node("Slice", [qkv, g.const(f"{n}.0", np.array([a], np.int64)),
                                g.const(f"{n}.1", np.array([b], np.int64)),
                                g.const(f"{n}.axis", np.array([2], np.int64))], n) for n, (a, b) in bounds.items()}
    g.node("Relu", [cut["k"]], "k_out")
    _declined(g, g.node("Relu", [g.node("Mul", [cut["q"], g.const("s", np.float32(0.5))], "scaled")], "y"),
              ("k_out",))


def test_a_sibling_split_reading_the_picked_columns_in_any_of_its_parts_blocks_the_fold():
    """The scaled part is qkv's last 8 columns; another Split of the same tensor leaves them out of its first
    part but holds them in its second: scaling them would change what that part reads."""
    g = _Graph()
    qkv = g.linear("x", "qkv", width=3 * WIDTH)
    g.nodes.append(helper.make_node("Split", [qkv], ["a", "b", "c"], name="thirds", axis=-1))
    halves = g.const("halves", np.array([WIDTH, 2 * WIDTH], np.int64))
    g.nodes.append(helper.make_node("Split", [qkv, halves], ["d", "e"], name="halves", axis=-1))
    for name in "abde":
        g.node("Relu", [name], f"{name}_out")
    _declined(g, g.node("Relu", [g.node("Mul", ["c", g.const("s", np.float32(0.5))], "scaled")], "y"),
              tuple(f"{n}_out" for n in "abde"))


def test_a_part_holding_some_rows_of_its_columns_is_not_scaled():
    """[n, tokens, 3w] viewed as [n, 3 tokens, w] and cut along the rows: the cut holds every column, but only
    the first tokens of them (the rest reach the output unscaled)."""
    g = _Graph()
    qkv = g.linear("x", "qkv", width=3 * WIDTH)
    rows = g.node("Reshape", [qkv, g.const("rows", np.array([0, 3 * TOKENS, WIDTH], np.int64))], "rows")
    sizes = g.const("sizes", np.array([TOKENS, 2 * TOKENS], np.int64))
    g.nodes.append(helper.make_node("Split", [rows, sizes], ["head", "tail"], name="split", axis=1))
    g.node("Relu", ["tail"], "tail_out")
    _declined(g, g.node("Relu", [g.node("Mul", ["head", g.const("s", np.float32(0.5))], "scaled")], "y"),
              ("tail_out",))


def test_a_part_whose_shape_inference_cannot_fix_is_not_scaled():
    """The heads' shape comes from a second input: which columns q holds cannot be told."""
    g = _Graph()
    qkv = g.linear("x", "qkv", width=3 * WIDTH)
    g.nodes.append(helper.make_node("Split", [qkv], ["q", "k", "v"], name="split", axis=-1, num_outputs=3))
    heads = g.node("Reshape", ["q", "heads_shape"], "qh")
    for name in ("k", "v"):
        g.node("Relu", [name], f"{name}_out")
    proto = g.model(g.node("Mul", [heads, g.const("s", np.float32(0.5))], "y"), ("k_out", "v_out"))
    proto.graph.input.append(helper.make_tensor_value_info("heads_shape", TensorProto.INT64, [4]))
    folded, count = _fold(proto)
    assert count == 0 and "Mul" in [n.op_type for n in folded.graph.node]


def test_a_layer_output_read_elsewhere_is_not_scaled():
    g = _Graph()
    h = g.linear("x", "h")
    _declined(g, g.node("Add", [g.node("Mul", [h, g.const("s", np.float32(0.5))], "scaled"), h], "y"))


@pytest.mark.parametrize("form", ["constant-divided", "per-column-through-reshape", "per-column-zero",
                                  "per-column-raises-rank", "graph-output", "no-layer"])
def test_what_is_not_a_scale_of_a_layer_stays(form):
    g = _Graph()
    h = "x" if form == "no-layer" else g.linear("x", "h")
    if form == "constant-divided":
        _declined(g, g.node("Div", [g.const("one", np.float32(1.0)), h], "y"))
    elif form == "per-column-through-reshape":  # its columns are not the layer's any more
        heads = g.node("Reshape", [h, g.const("split", np.array([0, TOKENS, HEADS, HEAD], np.int64))], "heads")
        _declined(g, g.node("Mul", [heads, g.const("s", np.linspace(0.5, 2, HEAD).astype(np.float32))], "y"))
    elif form == "per-column-zero":
        _declined(g, g.node("Div", [h, g.const("s", np.arange(WIDTH, dtype=np.float32))], "y"))
    elif form == "per-column-raises-rank":
        _declined(g, g.node("Mul", [h, g.const("s", np.full((1, 1, 1, WIDTH), 0.5, np.float32))], "y"))
    elif form == "graph-output":
        _declined(g, g.node("Relu", [g.node("Mul", [h, g.const("s", np.float32(0.5))], "scaled")], "y"), ("scaled",))
    else:
        _declined(g, g.node("Mul", [h, g.const("s", np.float32(0.5))], "y"))


@pytest.mark.parametrize("op, form", [("Mul", "vector"), ("Mul", "row"), ("Div", "vector")])
def test_a_per_column_layer_scale_goes_into_the_linear_columns(op, form):
    """ConvNeXt's and CaiT's layer scale, gamma * Linear(x): a [W] (or [1, 1, W]) constant after MatMul + bias."""
    g = _Graph(3)
    gamma = np.linspace(0.25, 2.0, WIDTH).astype(np.float32)
    constant = g.const("gamma", gamma if form == "vector" else gamma.reshape(1, 1, WIDTH))
    operands = [constant, g.linear("x", "fc")] if op == "Mul" else [g.linear("x", "fc"), constant]
    proto = g.model(g.node("Relu", [g.node(op, operands, "scaled")], "y"))
    folded, count = _fold(proto)
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Relu"]
    np.testing.assert_allclose(_run(folded), _run(proto), rtol=1e-5, atol=1e-5)
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    factor = gamma if op == "Mul" else 1 / gamma
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(next(v for k, v in weights.items() if k.startswith("fc.w")), original["fc.w"] * factor,
                               rtol=1e-6)


def test_a_gemm_takes_a_per_column_scale_in_its_transposed_weight_rows():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0.5, 2.0, -1.0, 3.0], np.float32), "gamma")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Mul", ["h", "gamma"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, count = _fold(proto)
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["Gemm", "Relu"]
    x = rng.standard_normal((2, 6)).astype(np.float32)
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (proto, folded)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6, atol=1e-6)


def test_quant_pipelines_fold_the_attention_scale_before_calibrating():
    proto = attention("mul", 0.5)
    data = [{"x": np.random.default_rng(i).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)} for i in range(4)]
    for pipeline in ("quant", "quant-trt"):
        result = optimize(proto, pipeline, calibration_data=data)
        assert next(r for r in result.records if r.name == "fold-scale").stats["folded"] == 1
        assert "Mul" not in [n.op for n in result.model.graph.nodes]


def test_a_projection_whose_shape_is_read_still_takes_the_scale():
    """torch's legacy exporter reads a projection's Shape to split it into heads: that reads no value."""
    g = _Graph()
    q = g.linear("x", "q")
    g.node("Shape", [q], "q_shape")
    proto = g.model(g.node("Relu", [g.node("Mul", [q, g.const("s", np.float32(0.25))], "scaled")], "y"),
                    ("q_shape",))
    proto.graph.output[1].type.tensor_type.elem_type = TensorProto.INT64
    folded, count = _fold(proto)
    assert count == 1 and "Mul" not in [n.op_type for n in folded.graph.node]
    np.testing.assert_array_equal(_run(folded), _run(proto))


def test_torch_legacy_export_with_dynamic_axes_quantizes_attention_in_integers(tmp_path):
    """q.shape[-1] ** 0.5 exported from dynamic shapes: fold-constants makes it a constant (the head width is
    known), fold-scale takes it, and ONNX Runtime's graph of the `quant` result has no float op left in the
    attention but the Softmax, on purpose (quantize_static's keeps the Div float)."""
    torch = pytest.importorskip("torch")
    import io

    torch.manual_seed(0)

    class Attention(torch.nn.Module):
        def __init__(self, width: int = 32, heads: int = 4):
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))

        def split(self, x):
            b, t, d = x.shape
            return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        def forward(self, x):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), -1) @ v
            b, h, t, d = a.shape
            return self.o(a.transpose(1, 2).reshape(b, t, h * d))

    buffer = io.BytesIO()
    torch.onnx.export(Attention().eval(), (torch.randn(2, 6, 32),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}})
    proto = onnx.load_from_string(buffer.getvalue())
    data = [{"x": np.random.default_rng(i).standard_normal((2, 6, 32)).astype(np.float32)} for i in range(8)]
    result = optimize(proto, "quant", calibration_data=data)
    assert next(r for r in result.records if r.name == "fold-scale").stats["folded"] == 1
    quantized = result.model.to_proto()
    x = {"x": np.random.default_rng(9).standard_normal((3, 5, 32)).astype(np.float32)}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    out = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, x)[0]
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert not {"Div", "Mul", "QLinearMul", "MatMul"} & set(fused)
    # The scores leave their integer MatMul in float for the Softmax (placement rule 8).
    assert fused.count("QGemm") == 4 and fused.count("QLinearMatMul") == 1 and "MatMulIntegerToFloat" in fused
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert float(np.sum(reference * out) / np.linalg.norm(reference) / np.linalg.norm(out)) > 0.999


@pytest.mark.parametrize("block", ["timm", "multihead"])
def test_torch_fused_qkv_attention_quantizes_without_a_scale_op(block, tmp_path):
    """timm's Attention (one qkv Linear, unbind, SDPA: q and k each by d^-1/4; dynamic batch) and torch's
    nn.MultiheadAttention (static): fold-scale puts the scales in the fused projection, and ONNX Runtime's graph
    of the `quant` result runs the block's products on integers with no Mul left."""
    from tests.quant.torch_models import attention_proto

    proto = attention_proto(block, dynamic_batch=block == "timm")
    data = [{"x": np.random.default_rng(i).standard_normal((2, 6, 48)).astype(np.float32)} for i in range(8)]
    result = optimize(proto, "quant", calibration_data=data)
    assert next(r for r in result.records if r.name == "fold-scale").stats["folded"] == 2
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    x = {"x": np.random.default_rng(9).standard_normal((2, 6, 48)).astype(np.float32)}
    out = ort.InferenceSession(result.model.to_proto().SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, x)[0]
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert not {"Mul", "QLinearMul", "MatMul"} & set(fused)
    assert fused.count("QLinearMatMul") == 1 and "MatMulIntegerToFloat" in fused  # scores float (rule 8)
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert float(np.sum(reference * out) / np.linalg.norm(reference) / np.linalg.norm(out)) > 0.999


def _random_fused_way(seed: int) -> tuple[onnx.ModelProto, bool]:
    """A fused [n, 4, 24] projection viewed as [n, 4, a, b, c] (a * b * c = 24, the parts axis anywhere), permuted
    at random, then cut along a random axis by Split, Slice or Gather, one part scaled. Returns the model and
    whether the cut runs along a column axis (so the scaled part is whole columns and the fold is sound)."""
    rng = np.random.default_rng(seed)
    g = _Graph(seed)
    rows = 4
    x = g.const("x_w", rng.standard_normal((WIDTH, 24)).astype(np.float32))
    h = g.node("Add", [g.node("MatMul", ["x", x], "mm"), g.const("bias", rng.standard_normal(24).astype(np.float32))],
               "h")
    split = [(2, 3, 4), (3, 2, 4), (4, 3, 2), (2, 2, 6)][rng.integers(4)]
    view = g.node("Reshape", [h, g.const("view_shape", np.array([-1, rows, *split], np.int64))], "view")
    perm = [int(p) for p in rng.permutation(5)]
    moved = g.node("Transpose", [view], "moved", perm=perm)
    dims = [(-1, rows, *split)[p] for p in perm]
    axis = int(rng.integers(5))
    size = dims[axis] if dims[axis] != -1 else 2  # the batch: 2 in the test runs
    kind = ["split", "slice", "gather"][rng.integers(3)]
    if kind == "gather" or size < 2:
        picked = g.node("Gather", [moved, g.const("at", np.array(0, np.int64))], "picked", axis=axis)
        others = [g.node("Gather", [moved, g.const(f"at{i}", np.array(i, np.int64))], f"other{i}", axis=axis)
                  for i in range(1, size)]
    elif kind == "slice":
        cut = size // 2
        bounds = [g.const(n, np.array([v], np.int64)) for n, v in (("s0", 0), ("e0", cut), ("ax", axis))]
        picked = g.node("Slice", [moved, *bounds], "picked")
        rest = [g.const(n, np.array([v], np.int64)) for n, v in (("s1", cut), ("e1", size), ("ax1", axis))]
        others = [g.node("Slice", [moved, *rest], "other1")]
    else:
        sizes = g.const("sizes", np.array([size // 2, size - size // 2], np.int64))
        g.nodes.append(helper.make_node("Split", [moved, sizes], ["picked", "other1"], name="cut", axis=axis))
        picked, others = "picked", ["other1"]
    scaled = g.node("Mul", [picked, g.const("s", np.float32(0.3))], "scaled")
    outputs = [g.node("Relu", [scaled], "y")] + [g.node("Relu", [o], f"{o}_out") for o in others]
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows, WIDTH])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return proto, perm[axis] >= 2  # axes 2-4 of the view split the 24 columns


@pytest.mark.parametrize("seed", range(40))
def test_random_fused_ways_fold_only_where_sound(seed):
    """Random views, permutations and cuts of a fused projection: the fold happens exactly where the cut runs
    along a column axis, and then every output (the scaled part and the parts left alone) is what it was."""
    proto, along_columns = _random_fused_way(seed)
    folded, count = _fold(proto)
    assert count == int(along_columns)
    x = np.random.default_rng(seed).standard_normal((2, 4, WIDTH)).astype(np.float32)
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for p in (proto, folded)]
    for before, after in zip(*runs, strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
