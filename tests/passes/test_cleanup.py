"""The `cleanup` pipeline and dce: exactness, idempotence, determinism, and Hypothesis properties on
random graphs (tests/graphgen.py): the IR verifies after every pass and ONNX Runtime's outputs do not
change."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from irtool import registry
from irtool.errors import VerificationError
from irtool.pipeline import parse_pipeline
from tests.graphgen import models
from tests.passes.helpers import assert_same_outputs, model_of, ops, run, serialized

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MESSY = """
g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] z) <float[2,2,1,1] w = {1.0, 0.5, -0.5, 1.0},
    float[2] b = {0.1, 0.2}, float[2,1,1] s1 = {0.1, 0.2}, float[2,1,1] s2 = {0.1, 0.2}, float[1] two = {2.0},
    int64[4] same = {1, 2, 3, 3}> {
  ws = Mul(w, two)
  c = Conv(x, ws, b)
  i = Identity(c)
  d = Dropout(i)
  r = Reshape(d, same)
  dead = Sigmoid(r)
  y = Add(r, s1)
  q = Mul(y, s2)
  z = Identity(q)
}
"""


def test_cleanup_pipeline_is_registered_in_fixed_point_order():
    names = [spec.name for spec in parse_pipeline("cleanup").passes]
    assert names == ["dce", "fold-constants", "dce", "eliminate-identity", "dedup-initializers"]
    assert registry.get_pipeline("cleanup") is not None


def test_cleanup_removes_the_mess_exactly():
    model = model_of(MESSY)
    original = model.copy()
    records = run(model, "cleanup")
    stats = {(r.name, k): v for r in records for k, v in r.stats.items() if v}
    assert stats == {("dce", "nodes_removed"): 1, ("fold-constants", "nodes_folded"): 1,
                     ("eliminate-identity", "nodes_removed"): 4, ("dedup-initializers", "initializers_merged"): 1,
                     ("dedup-initializers", "bytes_merged"): 8}
    assert ops(model) == ["Conv", "Add", "Mul"]
    assert [t.name for t in model.graph.outputs] == ["y", "z"]
    assert_same_outputs(original, model)


def _golden_inputs() -> list[Path]:
    return sorted(p.parent for p in GOLDEN.glob("*/*/pipeline.txt") if (p.parent / "model.onnxtxt").exists())


@pytest.mark.parametrize("case", _golden_inputs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cleanup_is_idempotent_and_deterministic_on_golden_inputs(case):
    text = (case / "model.onnxtxt").read_text()
    once, other = model_of(text), model_of(text)
    run(once, "cleanup")
    run(other, "cleanup")
    assert serialized(once) == serialized(other)
    records = run(once, "cleanup")
    assert not any(r.modified for r in records), [(r.name, r.stats) for r in records if r.modified]
    assert serialized(once) == serialized(other)


@given(models())
@PROPERTY
def test_property_cleanup_verifies_is_exact_idempotent_and_deterministic(proto):
    model = model_of(proto)
    original = model.copy()
    run(model, "cleanup")  # verify_each: the verifier runs after every pass
    assert_same_outputs(original, model, atol=1e-5, rtol=1e-5, seeds=(0,))
    first = serialized(model)
    again = original.copy()
    run(again, "cleanup")
    assert serialized(again) == first
    records = run(model, "cleanup")
    assert not any(r.modified for r in records)
    assert serialized(model) == first


@given(models())
@PROPERTY
def test_property_cleanup_then_fold_bn_preserves_outputs(proto):
    model = model_of(proto)
    original = model.copy()
    run(model, "cleanup")
    before = ops(model).count("BatchNormalization")
    folded = run(model, "fold-bn")[0].stats["bn_folded"]
    assert ops(model).count("BatchNormalization") == before - folded
    assert_same_outputs(original, model, atol=1e-4, rtol=1e-4, seeds=(0,))


@given(models())
@PROPERTY
def test_property_each_pass_alone_verifies_and_preserves_outputs(proto):
    for name in ("dce", "fold-constants", "eliminate-identity", "dedup-initializers"):
        model = model_of(proto)
        run(model, name)
        assert_same_outputs(model_of(proto), model, atol=1e-5, rtol=1e-5, seeds=(0,))


def test_dce_keeps_nodes_read_only_inside_a_subgraph():
    model = model_of("""
    g (float[2] x, bool c) => (float[2] y) {
      k = Abs(x)
      dead = Neg(x)
      y = If(c) <then_branch = t () => (float[2] ty) { ty = Relu(k) },
                 else_branch = e () => (float[2] ey) { unused = Exp(x)
                                                        ey = Sigmoid(x) }>
    }""")
    original = model.copy()
    records = run(model, "dce")
    assert records[0].stats == {"nodes_removed": 2}
    assert "Abs" in ops(model) and "Neg" not in ops(model) and "Exp" not in ops(model)
    assert_same_outputs(original, model)


def test_dce_declines_on_a_live_graph():
    model = model_of("g (float[2] x) => (float[2] y, float[2] z) { y = Relu(x)\n z = Neg(y) }")
    assert run(model, "dce")[0].modified is False


def test_invalid_input_is_refused_before_any_pass():
    proto = model_of("g (float[2] x) => (float[2] y) { y = Relu(x) }").to_proto()
    proto.graph.node[0].input[0] = "nowhere"
    from irtool.ir.model import Model

    with pytest.raises(VerificationError, match="input model"):
        run(Model.from_proto(proto), "cleanup")
