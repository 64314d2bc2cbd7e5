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


def test_a_fused_qkv_projection_split_into_heads_is_not_scaled():
    g = _Graph()
    qkv = g.linear("x", "qkv", width=3 * WIDTH)
    g.nodes.append(helper.make_node("Split", [qkv], ["q", "k", "v"], name="split", axis=-1, num_outputs=3))
    scores = g.node("MatMul", [g.heads("q", "qh", [0, 2, 1, 3]), g.heads("k", "kh", [0, 2, 3, 1])], "scores")
    probs = g.node("Softmax", [g.node("Mul", [scores, g.const("s", np.float32(0.5))], "scaled")], "probs")
    _declined(g, g.node("MatMul", [probs, g.heads("v", "vh", [0, 2, 1, 3])], "y"))


def test_a_layer_output_read_elsewhere_is_not_scaled():
    g = _Graph()
    h = g.linear("x", "h")
    _declined(g, g.node("Add", [g.node("Mul", [h, g.const("s", np.float32(0.5))], "scaled"), h], "y"))


@pytest.mark.parametrize("form", ["constant-divided", "per-channel", "graph-output", "no-layer"])
def test_what_is_not_a_scalar_scale_of_a_layer_stays(form):
    g = _Graph()
    h = "x" if form == "no-layer" else g.linear("x", "h")
    if form == "constant-divided":
        _declined(g, g.node("Div", [g.const("one", np.float32(1.0)), h], "y"))
    elif form == "per-channel":
        _declined(g, g.node("Mul", [h, g.const("s", np.full(WIDTH, 0.5, np.float32))], "y"))
    elif form == "graph-output":
        _declined(g, g.node("Relu", [g.node("Mul", [h, g.const("s", np.float32(0.5))], "scaled")], "y"), ("scaled",))
    else:
        _declined(g, g.node("Mul", [h, g.const("s", np.float32(0.5))], "y"))


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
    attention (quantize_static's keeps the Div float)."""
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
    assert not {"Div", "Mul", "Softmax", "QLinearMul", "MatMul"} & set(fused)
    assert fused.count("QGemm") == 4 and fused.count("QLinearMatMul") == 2 and "QLinearSoftmax" in fused
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert float(np.sum(reference * out) / np.linalg.norm(reference) / np.linalg.norm(out)) > 0.999
