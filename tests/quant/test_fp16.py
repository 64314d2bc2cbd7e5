"""fp16: accuracy budget on a torch CNN and transformer block, structure of the boundary Casts, block
lists, overflow clipping, value_info, subgraph readers, idempotence and the cases where it declines."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from irtool.errors import PipelineError
from irtool.ir.model import Model
from irtool.ir.printer import format_model
from irtool.ir.skeleton import infer_types
from irtool.pipeline import format_pipeline, parse_pipeline
from tests.graphgen import models
from tests.passes.helpers import feeds_for, model_of, node, run, run_ort, within_budget
from tests.quant.torch_models import cnn_proto, encoder_proto

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, cosine similarity)."""
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(a)), float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _initializer_types(model: Model) -> set[int]:
    return {t.data_type for t in model.to_proto().graph.initializer}


def _producer(model: Model, name: str):
    return next(n for n in model.graph.nodes if any(t.name == name for t in n.outputs))


def _value_type(proto: onnx.ModelProto, name: str) -> int:
    """The element type of a value as onnx shape inference sees it."""
    return infer_types(proto)[name][0]


# --------------------------------------------------------------------------- torch models
@pytest.mark.parametrize("build", [cnn_proto, encoder_proto], ids=["cnn", "encoder"])
def test_torch_models_stay_within_the_fp16_budget(build, record_property):
    original = model_of(build())
    model = original.copy()
    stats = run(model, "fp16")[0].stats
    assert stats["nodes_converted"] > 5 and stats["nodes_kept_fp32"] == 0
    assert _initializer_types(model) <= {F16, TensorProto.INT64}  # no float32 weight left
    # ONNX Runtime's CPU provider runs most float16 ops as float32 between its own Casts (and drops
    # f16->f32->f16 Cast pairs), so the reference evaluator, which computes in numpy float16, is the
    # stricter check of the float16 arithmetic itself.
    reference = ReferenceEvaluator(model.to_proto())
    for seed in (0, 1, 2):
        feeds = feeds_for(original.to_proto(), seed)
        ref = run_ort(original, feeds)["y"]
        for runner, got in (("ort", run_ort(model, feeds)["y"]), ("reference", reference.run(None, feeds)[0])):
            assert got.dtype == np.float32 and got.shape == ref.shape
            rel, cosine = _metrics(ref, got)
            record_property(f"{runner}_rel_l2_seed{seed}", rel)
            record_property(f"{runner}_cosine_seed{seed}", cosine)
            assert rel < 1e-2 and cosine > 0.999, runner
            assert np.max(np.abs(ref - got)) < 1e-2 * np.max(np.abs(ref)), runner


def test_interface_keeps_names_and_types_with_casts_at_the_boundary():
    model = model_of(cnn_proto())
    run(model, "fp16")
    proto = model.to_proto()
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [("x", F32)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output] == [("y", F32)]
    (reader,) = model.graph.inputs[0].outputs
    assert reader.op == "Cast" and reader.attrs["to"] == F16
    last = _producer(model, "y")
    assert last.op == "Cast" and last.attrs["to"] == F32
    assert _value_type(proto, last.inputs[0].name) == F16
    assert sum(n.op == "Cast" for n in model.graph.nodes) == 2


def test_layernorm_attention_and_gelu_run_in_fp16():
    model = model_of(encoder_proto())
    run(model, "fp16")
    proto = model.to_proto()
    for op in ("LayerNormalization", "Softmax", "MatMul", "Erf"):
        found = [n for n in proto.graph.node if n.op_type == op]
        assert found, op
        assert all(_value_type(proto, n.output[0]) == F16 for n in found), op


def test_no_stale_float32_value_info():
    model = model_of(encoder_proto())
    run(model, "fp16")
    proto = model.to_proto()
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    inferred = {i.name: i.type.tensor_type.elem_type
                for i in onnx.shape_inference.infer_shapes(bare, strict_mode=True).graph.value_info}
    stored = {i.name: i.type.tensor_type.elem_type for i in proto.graph.value_info}
    assert stored and all(inferred[name] == kind for name, kind in stored.items() if name in inferred)
    assert sum(kind == F16 for kind in stored.values()) > 50


# --------------------------------------------------------------------------- blocking
MLP = """
agraph (float[2, 8] x) => (float[2, 4] y) <float[8, 4] w = {%s}, float[4] b = {1, 2, 3, 4}> {
    h = MatMul(x, w)
    a = Add(h, b)
    y = Softmax<axis = -1>(a)
}
""" % ", ".join(str(v / 10) for v in range(32))


def test_block_ops_wraps_the_blocked_node_in_casts():
    model = model_of(MLP)
    original = model.copy()
    stats = run(model, "fp16{block-ops=[Softmax]}")[0].stats
    softmax = node(model, next(n.name for n in model.graph.nodes if n.op == "Softmax"))
    before = softmax.inputs[0].inputs[0]
    assert before.op == "Cast" and before.attrs["to"] == F32
    assert softmax.outputs[0].name == "y" and np.dtype(softmax.outputs[0].dtype) == np.float32
    assert stats["nodes_kept_fp32"] == 1 and stats["casts_inserted"] == 2  # x -> f16, Add -> f32
    feeds = feeds_for(original.to_proto())
    np.testing.assert_allclose(run_ort(model, feeds)["y"], run_ort(original, feeds)["y"], atol=2e-3)


def test_block_nodes_by_name_regex():
    model = model_of(MLP)
    add = next(n for n in model.graph.nodes if n.op == "Add")
    run(model, f"fp16{{block-nodes=['^{add.name}$']}}")
    proto = model.to_proto()
    assert _value_type(proto, "h") == F16 and _value_type(proto, "a") == F32
    add = next(n for n in model.graph.nodes if n.op == "Add")
    assert add.inputs[1].name == "b"  # the blocked node keeps the float32 initializer


def test_shared_initializer_gets_a_float16_copy_and_keeps_the_float32_original():
    model = model_of("""
    agraph (float[4] x) => (float[4] y, float[4] z) <float[4] c = {1, 2, 3, 4}, int64 axis = {0}> {
        y = Add(x, c)
        z = CumSum(c, axis)
    }""")
    run(model, "fp16")
    proto = model.to_proto()
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types == {"c": F32, "c_fp16": F16, "axis": TensorProto.INT64}  # CumSum is blocked by default
    feeds = feeds_for(proto)
    assert run_ort(model, feeds)["z"].tolist() == [1, 3, 6, 10]


def test_resize_scales_stay_float32_and_range_stays_blocked():
    model = model_of("""
    agraph (float[1, 1, 2, 2] x, float s) => (float[1, 1, 4, 4] y, float[?] r) <float[4] scales = {1, 1, 2, 2}> {
        y = Resize<mode = "nearest">(x, , scales)
        one = Constant<value = float {1}>()
        r = Range(one, s, one)
    }""")
    stats = run(model, "fp16")[0].stats
    proto = model.to_proto()
    resize = next(n for n in proto.graph.node if n.op_type == "Resize")
    assert _value_type(proto, resize.input[0]) == F16 and _value_type(proto, resize.input[2]) == F32
    assert _value_type(proto, next(n for n in proto.graph.node if n.op_type == "Range").output[0]) == F32
    assert stats["nodes_kept_fp32"] == 1
    out = run_ort(model, {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2), "s": np.array(4, np.float32)})
    assert out["y"][0, 0, 0].tolist() == [0, 0, 1, 1] and out["r"].tolist() == [1, 2, 3]


def test_cast_to_integer_keeps_reading_float32():
    model = model_of("""
    agraph (float[3] x) => (int64[3] i, float[3] y) {
        r = Relu(x)
        i = Cast<to = 7>(r)
        y = Cast<to = 1>(i)
    }""")
    run(model, "fp16")
    proto = model.to_proto()
    casts = {n.name: n for n in proto.graph.node if n.op_type == "Cast"}
    to_int = next(n for n in casts.values() if n.output[0] == "i")
    assert _value_type(proto, to_int.input[0]) == F32
    back = next(n for n in casts.values() if n.input[0] == "i")
    assert helper.get_attribute_value(back.attribute[0]) == F16  # int -> float now lands in float16
    feeds = {"x": np.array([1000.7, -3.2, 2.5], np.float32)}
    assert run_ort(model, feeds)["i"].tolist() == [1000, 0, 2]


def test_constant_nodes_are_rewritten_and_value_float_constants_blocked():
    model = model_of("""
    agraph (float[2, 3] x) => (float[2, 3] y) {
        c = Constant<value = float[3] {1.5, 2.5, 3.5}>()
        shape = Constant<value = int64[2] {2, 3}>()
        fill = ConstantOfShape<value = float[1] {0.25}>(shape)
        zeros = ConstantOfShape(shape)
        k = Constant<value_float = 2.0>()
        a = Add(x, c)
        b = Add(a, fill)
        d = Add(b, zeros)
        y = Mul(d, k)
    }""")
    run(model, "fp16")
    by_op = {}
    for n in model.graph.nodes:
        by_op.setdefault(n.op, []).append(n)
    constant = next(n for n in by_op["Constant"] if "value" in n.attrs and n.outputs[0].name == "c")
    assert np.asarray(constant.attrs["value"].values).dtype == np.float16
    assert [np.asarray(n.attrs["value"].values).dtype for n in by_op["ConstantOfShape"]] == [np.float16] * 2
    proto = model.to_proto()
    assert _value_type(proto, "k") == F32 and _value_type(proto, "d") == F16  # value_float stays float32
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], (x + [1.5, 2.5, 3.5] + 0.25) * 2, rtol=1e-3)


# --------------------------------------------------------------------------- constants, io, subgraphs
def test_overflowing_constants_are_clipped_with_a_warning(caplog):
    model = model_of("""
    agraph (float[4] x) => (float[4] y) <float[4] mask = {0, -1e9, 1e6, -inf}> {
        y = Add(x, mask)
    }""")
    with caplog.at_level(logging.WARNING, logger="irtool"):
        stats = run(model, "fp16")[0].stats
    assert stats["constants_clipped"] == 1
    assert any("mask" in r.getMessage() and "clipped" in r.getMessage() for r in caplog.records)
    half = next(t for t in model.to_proto().graph.initializer if t.name.startswith("mask"))
    assert numpy_helper.to_array(half).tolist() == [0, -65504, 65504, -np.inf]


def test_keep_io_types_false_changes_the_interface_to_float16():
    model = model_of(MLP)
    run(model, "fp16{keep-io-types=false}")
    proto = model.to_proto()
    assert proto.graph.input[0].type.tensor_type.elem_type == F16
    assert proto.graph.output[0].type.tensor_type.elem_type == F16
    assert not any(n.op_type == "Cast" for n in proto.graph.node)
    out = run_ort(model, {"x": np.ones((2, 8), np.float16)})["y"]
    assert out.dtype == np.float16 and np.allclose(out.sum(-1), 1, atol=1e-2)


def test_subgraph_readers_of_a_converted_value_get_float32():
    then_branch = helper.make_graph([helper.make_node("Identity", ["r"], ["t"], name="then_id")], "then", [],
                                    [helper.make_tensor_value_info("t", F32, [3])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["r"], ["e"], name="else_neg")], "else", [],
                                    [helper.make_tensor_value_info("e", F32, [3])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)],
        "g", [helper.make_tensor_value_info("x", F32, [3]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F32, [3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_of(proto)
    run(model, "fp16")
    assert np.dtype(node(model, "relu").outputs[0].dtype) == np.float16
    assert node(model, "else_neg").inputs[0].inputs[0].op == "Cast"
    x = np.array([-1.5, 0.25, 2.0], np.float32)
    for flag, expected in ((True, [0, 0.25, 2]), (False, [0, -0.25, -2])):
        assert run_ort(model, {"x": x, "c": np.array(flag)})["y"].tolist() == expected


# --------------------------------------------------------------------------- declines, idempotence, options
def test_second_run_changes_nothing():
    model = model_of(encoder_proto())
    run(model, "fp16{block-ops=[Softmax]}")
    once = model.to_proto().SerializeToString(deterministic=True)
    assert run(model, "fp16{block-ops=[Softmax]}")[0].modified is False
    assert model.to_proto().SerializeToString(deterministic=True) == once


@pytest.mark.parametrize("text", [
    "agraph (int64[3] x) => (int64[3] y) { y = Add(x, x) }",
    "agraph (double[3] x) => (double[3] y) { y = Relu(x) }",
    "agraph (float[3] x, int64[1] k) => (float[?] v, int64[?] i) { v, i = TopK(x, k) }",
])
def test_declines_without_float32_computation(text):
    model = model_of(text)
    before = model.to_proto().SerializeToString(deterministic=True)
    record = run(model, "fp16")[0]
    assert record.modified is False and record.stats == {"nodes_converted": 0}
    assert model.to_proto().SerializeToString(deterministic=True) == before


def test_pipeline_text_round_trips_and_rejects_unknown_keys():
    pipeline = parse_pipeline("fp16{block-ops=[Softmax,TopK],block-nodes=['^/head/.*'],keep-io-types=false}")
    assert format_pipeline(pipeline) == "fp16{block-ops=[Softmax,TopK],block-nodes=[^/head/.*],keep-io-types=false}"
    assert parse_pipeline(format_pipeline(pipeline)) == pipeline
    with pytest.raises(PipelineError, match="block-ops"):
        parse_pipeline("fp16{block=[Softmax]}")
    with pytest.raises(PipelineError, match="regular expression"):
        parse_pipeline("fp16{block-nodes=['(']}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_random_graphs_verify_stay_close_and_are_idempotent(proto):
    original = model_of(proto)
    model = original.copy()
    run(model, "fp16")  # verifies after the pass
    feeds = feeds_for(proto, 0)
    ref, got = run_ort(original, feeds), run_ort(model, feeds)
    for name, value in ref.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        assert within_budget(got[name], value), name
    once = format_model(model)
    assert run(model, "fp16")[0].modified is False and format_model(model) == once


def _two_quantized_convs(weight_scale: float) -> onnx.ModelProto:
    """x -> Q/DQ -> conv a (weight scale 0.01) -> Q/DQ -> conv b (weight scale `weight_scale`), opset 17."""
    nodes, inits = [], [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")]
    source = "x"
    for name, scale in (("a", 0.01), ("b", weight_scale)):
        weights = (np.arange(4 * 4 * 9) % 7 - 3).astype(np.int8).reshape(4, 4, 3, 3)
        inits += [numpy_helper.from_array(weights, f"{name}_wq"),
                  numpy_helper.from_array(np.full(4, scale, np.float32), f"{name}_ws"),
                  numpy_helper.from_array(np.zeros(4, np.int8), f"{name}_wz")]
        nodes += [helper.make_node("QuantizeLinear", [source, "s", "z"], [f"{name}_xq"], name=f"{name}_q"),
                  helper.make_node("DequantizeLinear", [f"{name}_xq", "s", "z"], [f"{name}_xd"], name=f"{name}_dq"),
                  helper.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws", f"{name}_wz"], [f"{name}_wd"],
                                   name=f"{name}_w_dq", axis=0),
                  helper.make_node("Conv", [f"{name}_xd", f"{name}_wd"], [f"{name}_y"], name=f"conv_{name}",
                                   pads=[1, 1, 1, 1])]
        source = f"{name}_y"
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", F32, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("b_y", F32, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("weight_scale, kept", [(0.02, 0), (1e-7, 1)])
def test_qdq_turn_float16_at_opset_19_unless_float16_cannot_hold_the_scale(weight_scale, kept, caplog):
    """Each DequantizeLinear feeds its Conv directly (what TensorRT fuses); a scale below float16's normal range
    (1e-7: a subnormal with 4 bits) keeps its DQ float32, Cast-wrapped, which trt-check then names."""
    from irtool.backends.trt_readiness import check_trt_readiness

    original = _two_quantized_convs(weight_scale)
    model = model_of(original)
    with caplog.at_level(logging.WARNING, logger="irtool"):
        stats = run(model, "fp16")[0].stats
    assert (model.opset, stats["opset_upgraded"], stats["qdq_kept_fp32"]) == (19, 1, kept)
    assert ("keep float32 scales" in caplog.text) == bool(kept)
    feeding = {n.name: [t.inputs[0].op for t in n.inputs[:2]] for n in model.graph.nodes if n.op == "Conv"}
    assert feeding == {"conv_a": ["DequantizeLinear"] * 2,
                       "conv_b": ["DequantizeLinear", "Cast" if kept else "DequantizeLinear"]}
    found = [(f.code, f.node) for f in check_trt_readiness(model.to_proto(), fp16=True).findings
             if f.code == "cast-after-dq"]
    assert found == ([("cast-after-dq", "conv_b")] if kept else [])
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    ref = run_ort(model_of(original), feeds)["b_y"]
    got = run_ort(model, feeds)["b_y"]
    assert got.dtype == np.float32 and within_budget(got, ref, 2e-2)
