"""dedup-initializers: what counts as identical, which copy survives, hash collisions, graph outputs,
subgraphs."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from irtool.passes import dedup
from tests.passes.helpers import assert_same_outputs, model_of, node, run

DUPLICATES = """
g (float[2,3] x) => (float[2,3] y) <float[3] zz = {1.0, 2.0, 3.0}, float[3] aa = {1.0, 2.0, 3.0},
    float[3] mm = {1.0, 2.0, 3.0}, float[3] other = {3.0, 2.0, 1.0}> {
  a = Add(x, aa)
  b = Mul(a, zz)
  c = Sub(b, mm)
  y = Add(c, other)
}
"""


def test_duplicates_merge_into_the_first_used_and_outputs_stay_exact():
    model = model_of(DUPLICATES)
    original = model.copy()
    records = run(model, "dedup-initializers")
    assert records[0].stats == {"initializers_merged": 2, "bytes_merged": 24, "transposes_tied": 0, "bytes_tied": 0}
    # The survivor is the first constant read in topological order (aa), not the first by name (aa/mm/zz).
    assert [node(model, n).inputs[1].name for n in ("Add_0", "Mul_0", "Sub_0", "Add_1")] == \
        ["aa", "aa", "aa", "other"]
    assert {t.name for t in model.to_proto().graph.initializer} == {"aa", "other"}
    assert_same_outputs(original, model)


def test_survivor_does_not_depend_on_initializer_order():
    first = model_of(DUPLICATES)
    proto = first.to_proto()
    reversed_inits = list(reversed(proto.graph.initializer))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(reversed_inits)
    second = model_of(proto)
    run(first, "dedup-initializers")
    run(second, "dedup-initializers")
    assert node(first, "Mul_0").inputs[1].name == node(second, "Mul_0").inputs[1].name == "aa"


def test_same_bytes_other_dtype_or_shape_and_signed_zero_stay_apart():
    model = model_of("""
    g (float[4] x, int32[4] xi, float[2,2] x22) => (float[4] y, int32[4] yi, float[2,2] y22)
      <float[4] z = {0.0, 0.0, 0.0, 0.0}, float[4] nz = {-0.0, 0.0, 0.0, 0.0}, int32[4] zi = {0, 0, 0, 0},
       float[2,2] z22 = {0.0, 0.0, 0.0, 0.0}> {
      a = Add(x, z)
      y = Mul(a, nz)
      yi = Add(xi, zi)
      y22 = Add(x22, z22)
    }""")
    assert run(model, "dedup-initializers")[0].modified is False


def test_hash_collision_never_merges_different_data(monkeypatch):
    class Collide:
        def __init__(self, data):
            pass

        def hexdigest(self):
            return "same"

    monkeypatch.setattr(hashlib, "sha256", Collide)
    model = model_of(DUPLICATES)
    records = run(model, "dedup-initializers")
    assert records[0].stats["initializers_merged"] == 2
    assert node(model, "Add_1").inputs[1].name == "other"


def test_constant_graph_output_keeps_its_name():
    model = model_of("""
    g (float[2] x) => (float[2] y, float[2] k2) <float[2] k1 = {1.0, 2.0}, float[2] k2 = {1.0, 2.0}> {
      a = Add(x, k1)
      y = Mul(a, k2)
    }""")
    original = model.copy()
    run(model, "dedup-initializers")
    assert [t.name for t in model.graph.outputs] == ["y", "k2"]
    assert isinstance(model.graph.outputs[1], gs.Constant)
    assert node(model, "Mul_0").inputs[1].name == "k1"
    assert_same_outputs(original, model)


def test_branch_constants_merge_with_outer_ones():
    model = model_of("""
    g (float[2] x, bool c) => (float[2] y) <float[2] w = {1.0, 2.0}> {
      a = Add(x, w)
      y = If(c) <then_branch = t () => (float[2] ty) <float[2] wt = {1.0, 2.0}> { ty = Mul(a, wt) },
                 else_branch = e () => (float[2] ey) <float[2] we = {1.0, 2.0}> { ey = Sub(a, we) }>
    }""")
    original = model.copy()
    assert run(model, "dedup-initializers")[0].stats["initializers_merged"] == 2
    if_node = node(model, "If_0")
    for branch in ("then_branch", "else_branch"):
        assert if_node.attrs[branch].nodes[0].inputs[1].name == "w"
    assert_same_outputs(original, model)


def test_groups_are_ordered_by_first_use():
    constants = [gs.Constant(n, v) for n, v in
                 [("b", _arr(2)), ("a", _arr(1)), ("b2", _arr(2)), ("a2", _arr(1))]]
    groups = dedup.duplicate_groups(constants)
    assert [[t.name for t in g] for g in groups] == [["b", "b2"], ["a", "a2"]]


def _arr(value: float) -> np.ndarray:
    return np.full(3, value, np.float32)


def test_scalar_and_one_element_vector_are_not_merged():
    """Same bytes, different rank: merging them changed a Concat's input rank (seen on a ViT export)."""
    import numpy as np
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper, numpy_helper

    from irtool.ir import Model
    from irtool.passmanager import PassContext, PassManager
    from irtool.pipeline import parse_pipeline

    nodes = [helper.make_node("Unsqueeze", ["s", "axes"], ["u"], name="unsq"),
             helper.make_node("Concat", ["u", "v", "x"], ["y"], name="cat", axis=0)]
    inits = [numpy_helper.from_array(np.array(7, np.int64), "s"), numpy_helper.from_array(np.array([7], np.int64), "v"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [3])], inits)
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    records = PassManager(parse_pipeline("dedup-initializers").build(), verify_each=True).run(model, PassContext())
    assert records[0].modified is False
    unsq = next(n for n in model.graph.nodes if n.name == "unsq")
    assert isinstance(unsq.inputs[0], gs.Constant) and unsq.inputs[0].values.shape == ()
