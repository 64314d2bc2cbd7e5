"""eliminate-identity: each recognized no-op, the ones that only look like no-ops, graph-output
names, subgraphs, and exact equivalence in ONNX Runtime."""

from __future__ import annotations

import pytest

from tests.passes.helpers import assert_same_outputs, model_of, node, ops, run

NOOPS = {
    "identity": "a = Identity(r)",
    "dropout": "a = Dropout(r)",
    "dropout_unused_mask": "a, m = Dropout(r)",
    "dropout_training_false": "a = Dropout(r, ratio, off)",
    "cast_same": "a = Cast <to = 1> (r)",
    "reshape_same": "a = Reshape(r, same)",
    "transpose_identity": "a = Transpose <perm = [0, 1, 2]> (r)",
    "pad_zero": "a = Pad(r, zeros)",
    "concat_single": "a = Concat <axis = 1> (r)",
}
REAL = {
    "dropout_training": "a = Dropout(r, ratio, on)",
    "cast_other_type": "c = Cast <to = 11> (r)\n a = Cast <to = 1> (c)",
    "reshape_other": "a = Reshape(r, other)",
    "transpose_real": "a = Transpose <perm = [0, 2, 1]> (r)",
    "pad_nonzero": "a = Pad(r, ones)",
    "concat_two": "a = Concat <axis = 1> (r, r)",
    "transpose_default_perm": "a = Transpose(r)",
}


def _model(body: str, out_shape: str = "2,3,3"):
    return model_of(f"""
    g (float[2,3,3] x) => (float[{out_shape}] y) <float ratio = {{0.0}}, bool off = {{0}}, bool on = {{1}},
        int64[3] same = {{2, 3, 3}}, int64[3] other = {{3, 2, 3}}, int64[6] zeros = {{0, 0, 0, 0, 0, 0}},
        int64[6] ones = {{0, 1, 0, 0, 1, 0}}> {{
      r = Relu(x)
      {body}
      y = Neg(a)
    }}""")


@pytest.mark.parametrize("case", sorted(NOOPS))
def test_noop_is_removed_and_outputs_are_exact(case):
    model = _model(NOOPS[case])
    original = model.copy()
    records = run(model, "eliminate-identity")
    assert records[0].stats["nodes_removed"] == 1
    assert ops(model) == ["Relu", "Neg"]
    assert node(model, "Neg_0").inputs[0].name == "r"
    assert_same_outputs(original, model)


@pytest.mark.parametrize("case", sorted(REAL))
def test_look_alikes_are_kept(case):
    shapes = {"reshape_other": "3,2,3", "transpose_real": "2,3,3", "pad_nonzero": "2,5,3",
              "concat_two": "2,6,3", "transpose_default_perm": "3,3,2"}
    model = _model(REAL[case], shapes.get(case, "2,3,3"))
    before = ops(model)
    records = run(model, "eliminate-identity")
    assert records[0].modified is False
    assert ops(model) == before


def test_dropout_with_used_mask_is_kept():
    model = model_of("""
    g (float[2] x) => (float[2] y, bool[2] m) {
      y, m = Dropout(x)
    }""")
    assert run(model, "eliminate-identity")[0].modified is False


def test_pad_option_off_keeps_zero_pad():
    model = _model(NOOPS["pad_zero"])
    assert run(model, "eliminate-identity{remove-pads=false}")[0].modified is False


def test_cast_of_int_input_to_same_type():
    model = model_of("g (int64[3] x) => (int64[3] y) { c = Cast <to = 7> (x)\n y = Neg(c) }")
    assert run(model, "eliminate-identity")[0].stats["nodes_removed"] == 1
    assert ops(model) == ["Neg"]


def test_output_name_moves_to_the_producer():
    model = model_of("""
    g (float[2] x) => (float[2] y, float[2] q) {
      r = Relu(x)
      y = Identity(r)
      q = Neg(r)
    }""")
    original = model.copy()
    run(model, "eliminate-identity")
    assert [t.name for t in model.graph.outputs] == ["y", "q"]
    assert ops(model) == ["Relu", "Neg"]
    relu = node(model, "Relu_0")
    assert relu.outputs[0].name == "y" and node(model, "Neg_0").inputs[0] is relu.outputs[0]
    assert_same_outputs(original, model)


def test_noop_from_graph_input_to_graph_output_becomes_identity():
    model = model_of("g (float[2] x) => (float[2] y) { y = Dropout(x) }")
    records = run(model, "eliminate-identity")
    assert records[0].stats == {"nodes_removed": 0, "nodes_made_identity": 1}
    assert ops(model) == ["Identity"] and model.graph.outputs[0].name == "y"
    assert run(model, "eliminate-identity")[0].modified is False


def test_identity_between_two_graph_outputs_stays():
    model = model_of("g (float[2] x) => (float[2] v, float[2] w) { v = Tanh(x)\n w = Identity(v) }")
    assert run(model, "eliminate-identity")[0].modified is False


def test_if_branches_are_rewired_and_outer_values_kept_visible():
    model = model_of("""
    g (float[2] x, bool c) => (float[2] y) {
      a = Relu(x)
      ai = Identity(a)
      y = If(c) <then_branch = then_g () => (float[2] t) {
          n = Neg(ai)
          t = Identity(n)
        }, else_branch = else_g () => (float[2] e) {
          e = Identity(ai)
        }>
    }""")
    original = model.copy()
    records = run(model, "eliminate-identity")
    assert records[0].stats["nodes_removed"] == 2
    if_node = node(model, "If_0")
    then_g, else_g = if_node.attrs["then_branch"], if_node.attrs["else_branch"]
    assert [n.op for n in then_g.nodes] == ["Neg"] and then_g.outputs[0].name == "t"
    # A branch cannot return an outer value by name alone: its Identity stays, now reading `a`.
    assert [n.op for n in else_g.nodes] == ["Identity"] and else_g.nodes[0].inputs[0].name == "a"
    assert_same_outputs(original, model)


def test_a_reshape_that_is_a_no_op_only_under_input_shapes_pins_them():
    """Reshape(x, [2, -1]) of x[N, 4] is a no-op for N = 2 only: dropping it under --input-shape x:2x4 makes the
    model right for that shape alone, so its input then declares it. Without input shapes the Reshape stays."""
    from irtool.passmanager import PassContext

    text = "g (float[N,4] x) => (float[2,?] y) <int64[2] s = {2, -1}> { y = Reshape(x, s) }"
    kept = model_of(text)
    assert run(kept, "eliminate-identity")[0].modified is False and ops(kept) == ["Reshape"]
    pinned = model_of(text)
    stats = run(pinned, "eliminate-identity", PassContext(input_shapes={"x": [2, 4]}))[0].stats
    assert stats["inputs_pinned"] == ["x"] and pinned.graph.inputs[0].shape == [2, 4]
    dynamic = model_of("g (float[N,4] x) => (float[N,4] y) <int64[2] s = {0, -1}> { y = Reshape(x, s) }")
    stats = run(dynamic, "eliminate-identity", PassContext(input_shapes={"x": [2, 4]}))[0].stats
    assert stats["nodes_made_identity"] + stats["nodes_removed"] == 1 and "inputs_pinned" not in stats
    assert dynamic.graph.inputs[0].shape == ["N", 4]
