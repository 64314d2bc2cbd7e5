"""fold-constants: what folds, what must never fold (QDQ, random, subgraph ops, size), subgraphs,
Shape folding, the evaluator fallback, and bit-exact equivalence in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from irtool.passes import fold_constants
from irtool.passmanager import PassContext
from tests.passes.helpers import assert_same_outputs, model_of, node, ops, run

SUBEXPRESSION = """
g (float[2,3] x) => (float[2,3] y) <float[3] a = {1.0, 4.0, 9.0}, float[3] b = {0.5, 0.5, 0.5}> {
  s = Sqrt(a)
  t = Mul(s, b)
  u = Exp(t)
  y = Add(x, u)
}
"""


def test_constant_subexpression_becomes_one_initializer_with_exact_outputs():
    model = model_of(SUBEXPRESSION)
    original = model.copy()
    records = run(model, "fold-constants")
    assert records[0].stats == {"nodes_folded": 3}
    assert ops(model) == ["Add"]
    folded = node(model, "Add_0").inputs[1]
    assert isinstance(folded, gs.Constant) and folded.name == "u"
    np.testing.assert_allclose(folded.values, np.exp(np.sqrt([1.0, 4.0, 9.0]) * 0.5).astype(np.float32), rtol=1e-6)
    assert_same_outputs(original, model)


def test_folds_in_models_that_import_a_custom_domain():
    """onnx knows no IR version for com.microsoft; the one-node models fold-constants evaluates must not ask."""
    model = model_of("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2,3] x) => (float[2,3] y) <float[3] a = {1.0, 4.0, 9.0}> {
          s = Sqrt(a)
          g = com.microsoft.Gelu(x)
          y = Add(g, s)
        }""")
    original = model.copy()
    assert run(model, "cleanup")[1].stats == {"nodes_folded": 1}
    assert ops(model) == ["Gelu", "Add"]
    assert_same_outputs(original, model)


def test_nothing_to_fold_declines():
    model = model_of("g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add(x, w) }")
    records = run(model, "fold-constants")
    assert records[0].modified is False and records[0].stats["nodes_folded"] == 0


QDQ = """
g (float[1,3] x) => (float[1,2] y, int8[3] q) <int8[3,2] wq = {1, 2, 3, 4, 5, 6}, float s = {0.1}, int8 z = {0},
    float[3] a = {0.3, -0.7, 1.1}> {
  w = DequantizeLinear(wq, s, z)
  aq = QuantizeLinear(a, s, z)
  ad = DequantizeLinear(aq, s, z)
  q = QuantizeLinear(a, s, z)
  xa = Add(x, ad)
  y = MatMul(xa, w)
}
"""


def test_qdq_weights_stay_quantized_but_a_lone_quantize_folds():
    model = model_of(QDQ)
    original = model.copy()
    records = run(model, "fold-constants")
    # Only the QuantizeLinear whose result is a plain output (no DequantizeLinear reader) folds.
    assert records[0].stats["nodes_folded"] == 1
    assert ops(model).count("DequantizeLinear") == 2 and ops(model).count("QuantizeLinear") == 1
    assert node(model, "DequantizeLinear_0").inputs[0].name == "wq"
    assert_same_outputs(original, model)


def test_random_ops_are_never_folded():
    model = model_of("""
    g (float[2] x) => (float[2] y) {
      r = RandomNormal <shape = [2], seed = 1.0> ()
      y = Add(x, r)
    }""")
    records = run(model, "fold-constants")
    assert records[0].modified is False
    assert "RandomNormal" in ops(model)


def test_size_limit_blocks_folding_large_outputs():
    text = """
    g (float[32,32] x) => (float[32,32] y) <int64[2] shp = {32, 32}> {
      big = ConstantOfShape <value = float[1] {1.0}> (shp)
      y = Add(x, big)
    }"""
    small = model_of(text)
    assert run(small, "fold-constants{max-bytes=4095}")[0].modified is False
    large = model_of(text)
    assert run(large, "fold-constants{max-bytes=4096}")[0].stats["nodes_folded"] == 1


def test_size_limit_also_checked_after_evaluation(monkeypatch):
    # Without a statically known output shape, the value itself is measured.
    monkeypatch.setattr(fold_constants, "_expected_bytes", lambda tensor, types: 0)
    model = model_of("""
    g (float[8,8] x) => (float[8,8] y) <int64[2] shp = {8, 8}> {
      big = ConstantOfShape <value = float[1] {1.0}> (shp)
      y = Add(x, big)
    }""")
    assert run(model, "fold-constants{max-bytes=255}")[0].modified is False


def test_shape_of_static_value_folds_with_start_and_end():
    model = model_of("""
    g (float[2,3,4] x) => (float[12,2] y) {
      r = Relu(x)
      tail = Shape <start = 1> (r)
      prod = ReduceProd <keepdims = 1, axes = [0]> (tail)
      head = Shape <end = 1> (r)
      shp = Concat <axis = 0> (prod, head)
      y = Reshape(r, shp)
    }""")
    original = model.copy()
    records = run(model, "fold-constants")
    assert records[0].stats["nodes_folded"] == 4
    assert ops(model) == ["Relu", "Reshape"]
    np.testing.assert_array_equal(node(model, "Reshape_0").inputs[1].values, [12, 2])
    assert_same_outputs(original, model)


def test_shape_of_symbolic_value_is_left_alone():
    model = model_of("""
    g (float[N,3] x) => (int64[2] y) {
      y = Shape(x)
    }""")
    assert run(model, "fold-constants")[0].modified is False


def test_known_dims_picked_out_of_a_dynamic_shape_fold():
    """torch's legacy exporter with dynamic axes: q.shape[-1] ** 0.5 and x.shape[2:] out of a [N, T, 16] shape."""
    model = model_of("""
    g (float[N,T,16] x) => (float[N,T,16] y, int64[1] z) <int64 last = {-1}, int64[1] two = {2},
                                                        int64[1] three = {3}> {
      s = Shape(x)
      d = Gather <axis = 0> (s, last)
      f = Cast <to = 1> (d)
      root = Sqrt(f)
      y = Div(x, root)
      z = Slice(s, two, three)
    }""")
    original = model.copy()
    records = run(model, "fold-constants")
    # Gather, Cast, Sqrt, Slice; the Shape is left dead, for the dce after it in `cleanup`.
    assert ops(model) == ["Shape", "Div"] and records[0].stats["nodes_folded"] == 4
    np.testing.assert_array_equal(node(model, "Div_0").inputs[1].values, np.float32(4.0))
    np.testing.assert_array_equal(model.graph.outputs[1].values, [16])
    assert "inputs_pinned" not in records[0].stats  # the model's own shapes: nothing specialized
    assert_same_outputs(original, model)


def test_a_dynamic_dim_picked_out_of_a_shape_stays():
    model = model_of("""
    g (float[N,T,16] x) => (int64[1] y, int64[3] z) <int64[1] zero = {0}, int64[1] three = {3}> {
      s = Shape(x)
      y = Gather <axis = 0> (s, zero)
      z = Slice(s, zero, three)
    }""")
    assert run(model, "fold-constants")[0].modified is False


EXPAND_TARGET = """
g (float[N,6,4] x) => (int64[3] y, bool[3] e) <int64 zero = {0}, int64[1] axes = {0}, int64[1] k = {PIECE},
    int64[3] c = {COMPARED}, int64[3] ones = {1, 1, 1}> {
  s = Shape(x)
  b = Gather <axis = 0> (s, zero)
  bu = Unsqueeze(b, axes)
  t = Concat <axis = 0> (bu, k, k)
  e = Equal(t, c)
  y = Where(e, ones, t)
}"""


@pytest.mark.parametrize(("piece", "compared", "folds"), [
    ("-1", "-1, -1, -1", True),   # torch's expand(N, -1, -1): N from Shape is never -1
    ("-1", "-1, -1, 5", True),    # a constant piece is compared as it is
    ("-1", "0, -1, -1", False),   # N may be 0
    ("7", "-1, 7, 7", True),
])
def test_equal_of_shape_dims_with_negatives_folds_and_the_where_becomes_a_concat(piece, compared, folds):
    model = model_of(EXPAND_TARGET.replace("PIECE", piece).replace("COMPARED", compared))
    original = model.copy()
    run(model, "fold-constants")
    assert ("Equal" not in ops(model)) == folds
    assert ("Where" not in ops(model)) == folds
    if folds:
        concat = node(model, "Where_0")  # the Where node, now a Concat of N and the picked constants
        picked = [np.asarray(t.values).tolist() for t in concat.inputs[1:]]
        mask = np.asarray(model.graph.outputs[1].values).tolist()
        assert concat.op == "Concat" and concat.inputs[0].name == "bu"
        assert picked == [[1] if m else [int(piece)] for m in mask[1:]]
    assert_same_outputs(original, model)


def test_a_where_whose_mask_splits_a_piece_stays():
    model = model_of("""
    g (float[N,6,4] x) => (int64[3] y) <int64[2] zero = {0, 1}, int64[1] minus = {-1}, bool[3] m = {1, 0, 1},
                                      int64[3] ones = {1, 1, 1}> {
      s = Shape(x)
      b = Gather <axis = 0> (s, zero)
      t = Concat <axis = 0> (b, minus)
      y = Where(m, ones, t)
    }""")
    assert "Where" in ops(model) and run(model, "fold-constants")[0].modified is False


def test_shape_folding_can_be_switched_off():
    model = model_of("g (float[2,3] x) => (int64[2] y) { y = Shape(x) }")
    assert run(model, "fold-constants{fold-shapes=false}")[0].modified is False


def test_context_input_shapes_make_symbolic_shapes_static():
    """The folded [5, 3] holds for that input shape only, so the input then declares it (a BERT export folded
    this way and run at another batch failed inside ONNX Runtime)."""
    model = model_of("g (float[N,3] x) => (int64[2] y) { r = Relu(x)\n y = Shape(r) }")
    records = run(model, "fold-constants", PassContext(input_shapes={"x": [5, 3]}))
    assert records[0].stats["nodes_folded"] == 1 and records[0].stats["inputs_pinned"] == ["x"]
    np.testing.assert_array_equal(model.graph.outputs[0].values, [5, 3])
    assert model.graph.inputs[0].shape == [5, 3]


def test_input_shapes_that_fold_no_shape_leave_the_inputs_dynamic():
    model = model_of("g (float[N,3] x) => (float[N,3] y) { y = Relu(x) }")
    records = run(model, "fold-constants", PassContext(input_shapes={"x": [5, 3]}))
    assert "inputs_pinned" not in records[0].stats and model.graph.inputs[0].shape == ["N", 3]


IF_MODEL = """
g (float[2] x, bool c) => (float[2] y) <float[2] k = {4.0, 9.0}> {
  y = If(c) <then_branch = then_g () => (float[2] t) {
      r = Sqrt(k)
      t = Mul(x, r)
    }, else_branch = else_g () => (float[2] e) {
      e = Neg(x)
    }>
}
"""


def test_constant_expression_inside_if_branch_folds():
    model = model_of(IF_MODEL)
    original = model.copy()
    records = run(model, "fold-constants")
    assert records[0].stats["nodes_folded"] == 1
    assert "Sqrt" not in ops(model) and "If" in ops(model)
    assert_same_outputs(original, model)


def test_if_with_constant_condition_is_not_folded():
    model = model_of("""
    g (float[2] x) => (float[2] y) <bool c = {1}> {
      y = If(c) <then_branch = t () => (float[2] a) { a = Neg(x) }, else_branch = e () => (float[2] b) { b = Abs(x) }>
    }""")
    assert run(model, "fold-constants")[0].modified is False


def test_folded_graph_output_keeps_its_name():
    model = model_of("""
    g (float[2] x) => (float[2] y, float[2] z) <float[2] a = {1.0, 2.0}> {
      y = Relu(x)
      z = Neg(a)
    }""")
    original = model.copy()
    run(model, "fold-constants")
    assert [t.name for t in model.graph.outputs] == ["y", "z"]
    assert isinstance(model.graph.outputs[1], gs.Constant)
    assert_same_outputs(original, model)


def test_reference_evaluator_is_the_fallback(monkeypatch):
    def no_ort(proto, feeds):
        raise RuntimeError("pretend ORT lacks this kernel")

    monkeypatch.setattr(fold_constants, "_run_ort", no_ort)
    model = model_of(SUBEXPRESSION)
    original = model.copy()
    assert run(model, "fold-constants")[0].stats["nodes_folded"] == 3
    assert_same_outputs(original, model, atol=1e-6, rtol=1e-6)


def test_a_node_no_evaluator_can_run_is_left_alone(monkeypatch):
    def fail(proto, feeds):
        raise RuntimeError("cannot evaluate")

    monkeypatch.setattr(fold_constants, "_run_ort", fail)
    monkeypatch.setattr(fold_constants, "_run_reference", fail)
    model = model_of(SUBEXPRESSION)
    assert run(model, "fold-constants")[0].modified is False
    assert ops(model) == ["Sqrt", "Mul", "Exp", "Add"]


def test_non_default_domain_is_skipped():
    model = model_of("""
    <ir_version: 8, opset_import: ["" : 17, "custom.ops" : 1]>
    g (float[2] x) => (float[2] y) <float[2] a = {1.0, 2.0}> {
      c = custom.ops.Twice(a)
      y = Add(x, c)
    }""")
    assert fold_constants.FoldConstants()._foldable(node(model, "Twice_0"), {}) is False


@pytest.mark.parametrize("op", sorted(fold_constants.NEVER_FOLD))
def test_never_fold_list_is_honoured(op):
    fake = gs.Node(op, name="n", inputs=[gs.Constant("a", np.ones(2, np.float32))], outputs=[gs.Variable("o")])
    assert fold_constants.FoldConstants()._foldable(fake, {}) is False
