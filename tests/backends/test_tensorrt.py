"""TensorRT: the pure-Python readiness check on real ONNX models, shape profiles, version dispatch, the lazy
import and the CLI without TensorRT -- and GPU tests (marked `gpu`) that build and run real engines against
ONNX Runtime where TensorRT and a GPU exist. Nothing here fakes an engine or its results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.backends import tensorrt as trt_backend
from irtool.backends.tensorrt import (
    INSTALL_HINT,
    TrtRunner,
    network_flags,
    precision_flags,
    trt_features,
    trt_major,
)
from irtool.backends.trt_readiness import (
    INT8_NEEDS_QDQ,
    Severity,
    ShapeProfile,
    check_trt_readiness,
    parse_shape_profile,
    parse_shape_profiles,
    profile_problems,
)
from irtool.errors import BackendUnavailable, InputError
from tests.cli.conftest import assert_one_line_error, run_cli

F = TensorProto.FLOAT
IR_VERSION = 10  # onnxruntime here reads IR <= 13
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------- models
def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def cnn(batch: int | str = "N") -> onnx.ModelProto:
    """conv-relu-conv-relu-GAP-flatten-gemm on [batch, 3, 16, 16] -> [batch, 4]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [batch, 3, 16, 16])],
                      [helper.make_tensor_value_info("y", F, [batch, 4])], inits)


def quantized_cnn(profile: str) -> onnx.ModelProto:
    calib = [{"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    result = optimize(cnn(), f"calibrate,insert-qdq{{profile={profile}}}", calibration_data=calib)
    return result.model.to_proto()


def single_op(op: str, name: str, domain: str = "", opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name=name, domain=domain)
    return make_model([node], [helper.make_tensor_value_info("x", F, [1, 4])],
                      [helper.make_tensor_value_info("y", F, [1, 4])], opset=opset)


def codes(readiness) -> list[str]:
    return [f.code for f in readiness.findings]


# ----------------------------------------------------------------------------------------- readiness
def test_clean_static_conv_model_is_ready_with_no_findings():
    readiness = check_trt_readiness(cnn(batch=2))
    assert readiness.ready
    assert readiness.findings == []
    assert readiness.opset == 17
    assert readiness.to_dict() == {"ready": True, "opset": 17, "counts": {"error": 0, "warning": 0, "info": 0},
                                   "findings": []}


@pytest.mark.parametrize("op", ["Unique", "MatMulInteger", "NoSuchOp"])
def test_unsupported_op_is_an_error_naming_the_node(op):
    readiness = check_trt_readiness(single_op(op, "the_node"))
    assert not readiness.ready
    [finding] = readiness.findings
    assert (finding.severity, finding.code, finding.node) == (Severity.ERROR, "unsupported-op", "the_node")
    assert finding.message.startswith(f"node 'the_node' ({op}): ")


def test_custom_domain_op_needs_a_plugin():
    model = single_op("FusedGelu", "gelu", domain="com.microsoft")
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    [finding] = check_trt_readiness(model).findings
    assert (finding.code, finding.node) == ("custom-op", "gelu")
    assert "'com.microsoft' domain" in finding.message and "plugin named 'FusedGelu'" in finding.message


def test_unnamed_nodes_get_op_and_index_names():
    model = single_op("Unique", "")
    assert check_trt_readiness(model).findings[0].node == "Unique#0"


def test_uint8_qdq_from_ort_cpu_profile_is_not_trt_ready():
    fixed = ShapeProfile((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16))
    readiness = check_trt_readiness(quantized_cnn("ort-cpu"), shapes={"x": fixed})
    assert not readiness.ready
    uint8 = readiness.by_code("uint8-qdq")
    # ort-cpu puts u8 pairs on x, r1, r2, p and f: every Q and DQ of them is named.
    assert sorted(f.node for f in uint8) == sorted(f"{t}_{op}" for t in ("x", "r1", "r2", "p", "f")
                                                  for op in ("QuantizeLinear", "DequantizeLinear"))
    assert all(f.severity is Severity.ERROR for f in uint8)
    assert "TensorRT quantizes to signed INT8 only" in uint8[0].message
    assert "insert-qdq{profile=trt}" in uint8[0].message
    # The input's range is not centred: its asymmetric zero point is not 0 either.
    zero = readiness.by_code("zero-point")
    assert {f.node for f in zero} == {"x_QuantizeLinear", "x_DequantizeLinear"}
    assert "zero points of 0" in zero[0].message


def test_trt_profile_output_on_a_small_cnn_is_ready():
    model = quantized_cnn("trt")
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    readiness = check_trt_readiness(model, shapes={"x": ShapeProfile((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))},
                                    int8=True)
    assert readiness.ready
    assert readiness.findings == []


def test_dynamic_dims_warn_and_suggest_shapes():
    readiness = check_trt_readiness(cnn(batch="N"))
    assert readiness.ready
    [finding] = readiness.findings
    assert (finding.severity, finding.code, finding.node) == (Severity.WARNING, "dynamic-shape", None)
    assert finding.message == ("input 'x' has dynamic dims [N, 3, 16, 16]: TensorRT needs an optimization profile; "
                               "give --shapes x:MIN,OPT,MAX (e.g. x:1x3x16x16,1x3x16x16,1x3x16x16)")


def test_profiles_are_checked_against_the_inputs():
    good = {"x": ShapeProfile((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    assert check_trt_readiness(cnn(), shapes=good).findings == []
    wrong_fixed = {"x": ShapeProfile((1, 3, 8, 16), (1, 3, 16, 16), (1, 3, 16, 16))}
    [finding] = check_trt_readiness(cnn(), shapes=wrong_fixed).findings
    assert (finding.severity, finding.code) == (Severity.ERROR, "profile")
    assert finding.message == "--shapes x:1x3x8x16,1x3x16x16,1x3x16x16: dim 2 is fixed to 16, the profile gives 8,16,16"
    [unknown] = check_trt_readiness(cnn(batch=1), shapes={"image": good["x"]}).findings
    assert unknown.message == "--shapes names 'image', which is not a model input (x)"


def _conv_with_weight_dq(axis: int | None, zero_point: int = 0, qtype=TensorProto.INT8) -> onnx.ModelProto:
    w = np.arange(4 * 3 * 3 * 3, dtype=np.int8).reshape(4, 3, 3, 3) % 50
    scale = np.full(4, 0.01, np.float32)
    zp = np.full(4, zero_point, helper.tensor_dtype_to_np_dtype(qtype))
    x_q = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
           helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq")]
    attrs = {} if axis is None else {"axis": axis}
    nodes = x_q + [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w_dq", **attrs),
                   helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(zp, "wz"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz")]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])], inits)


def test_per_channel_weight_scales_must_follow_conv_output_channels():
    assert check_trt_readiness(_conv_with_weight_dq(axis=0)).findings == []
    for axis in (None, 1):  # ONNX's default axis is 1: the input-channel axis of a Conv weight
        [finding] = check_trt_readiness(_conv_with_weight_dq(axis=axis)).findings
        assert (finding.severity, finding.code, finding.node) == (Severity.ERROR, "qdq-axis", "w_dq")
        assert finding.message == ("DequantizeLinear 'w_dq' scales the weight of Conv 'conv' per channel along axis 1 "
                                   "(4 scales); TensorRT needs the output-channel axis 0 (4 channels)")


def test_nonzero_weight_zero_point_and_16_bit_types_are_errors():
    [finding] = check_trt_readiness(_conv_with_weight_dq(axis=0, zero_point=3)).findings
    assert (finding.code, finding.node) == ("zero-point", "w_dq")
    assert finding.message.startswith("DequantizeLinear 'w_dq': zero point [3, 3, 3, 3...] is not 0")
    model = _conv_with_weight_dq(axis=0, qtype=TensorProto.INT16)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(model.graph.initializer[0]).astype(np.int16), "wq"))
    model.opset_import[0].version = 21
    found = check_trt_readiness(model).findings
    assert [(f.code, f.node) for f in found if f.severity is Severity.ERROR] == [("qdq-type", "w_dq")]
    assert "uses INT16: TensorRT quantizes to INT8, INT4, FP8 only" in found[-1].message


def test_quantize_without_zero_point_is_uint8_per_onnx_default():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 4])], [numpy_helper.from_array(np.float32(0.1), "s")])
    assert [(f.code, f.node) for f in check_trt_readiness(model).findings] == [("uint8-qdq", "q"), ("uint8-qdq", "dq")]


def test_weight_only_quantization_warns_that_the_layer_runs_in_float():
    model = _conv_with_weight_dq(axis=0)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[0] = "x"
    found = [f for f in check_trt_readiness(model).findings if f.code == "partial-qdq"]
    assert [(f.severity, f.node) for f in found] == [(Severity.WARNING, "conv")]


def test_a_cast_between_a_dequantize_and_its_layer_is_a_warning():
    """DQ -> Cast -> Conv, as a float16 conversion at opset < 19 left it: TensorRT does not fuse that DQ."""
    model = _conv_with_weight_dq(axis=0)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node(
        "Cast", ["wd"], ["wd16"], name="w_cast", to=TensorProto.FLOAT16))
    conv.input[1] = "wd16"
    found = check_trt_readiness(model).findings
    assert [(f.severity, f.code, f.node) for f in found] == [(Severity.WARNING, "cast-after-dq", "conv")]
    assert "make the Q/DQ float16 (opset 19" in found[0].message


def test_int8_request_without_qdq_is_an_error():
    [finding] = check_trt_readiness(cnn(batch=1), int8=True).findings
    assert (finding.severity, finding.code, finding.message) == (Severity.ERROR, "int8-needs-qdq", INT8_NEEDS_QDQ)
    assert "insert-qdq{profile=trt}" in INT8_NEEDS_QDQ


def test_op_restrictions_from_the_support_matrix():
    maxpool = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2])
    model = make_model([maxpool], [helper.make_tensor_value_info("x", F, [1, 2, 8])],
                       [helper.make_tensor_value_info("y", F, [1, 2, 4]),
                        helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2, 4])])
    messages = [f.message for f in check_trt_readiness(model).findings]
    assert messages == ["node 'pool' (MaxPool): TensorRT pools in 2D or 3D only, this kernel has 1 dims",
                        "node 'pool' (MaxPool): the Indices output is not supported"]
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")
    model = make_model([resize], [helper.make_tensor_value_info("x", F, [1, 1, 4, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 1, 8, 8])],
                       [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    [finding] = check_trt_readiness(model).findings
    assert finding.message == ("node 'up' (Resize): mode='cubic' is not supported "
                               "(TensorRT takes ['linear', 'nearest'])")


def test_reduce_axes_must_be_constant():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")
    model = make_model([node], [helper.make_tensor_value_info("x", F, [2, 3]),
                                helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                       [helper.make_tensor_value_info("y", F, None)])
    [finding] = check_trt_readiness(model).findings
    assert (finding.code, finding.node) == ("op-restriction", "sum")
    assert "`axes` must be an initializer" in finding.message


def test_nodes_inside_if_branches_are_checked_with_their_path():
    def branch(op: str, out: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x"], [out], name=f"{op.lower()}_in_branch")], op,
                                 [], [helper.make_tensor_value_info(out, F, [1, 4])])
    node = helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch("Relu", "t"),
                            else_branch=branch("Unique", "e"))
    model = make_model([node], [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                helper.make_tensor_value_info("x", F, [1, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 4])])
    readiness = check_trt_readiness(model)
    assert [(f.severity, f.code, f.node) for f in readiness.findings] == [
        (Severity.INFO, "subgraph", "gate"), (Severity.ERROR, "unsupported-op", "gate/else_branch/unique_in_branch")]
    else_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    else_branch.output[0].name = else_branch.node[0].output[0] = "t"  # both branches now produce "t"
    [same_names] = check_trt_readiness(model).by_code("op-restriction")
    assert (same_names.severity, same_names.node) == (Severity.ERROR, "gate")
    assert "must name their outputs differently, both produce ['t']" in same_names.message


def test_int64_values_outside_int32_range_warn_but_slice_bounds_do_not():
    big = numpy_helper.from_array(np.array([2**40], np.int64), "big")
    ends = numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "ends")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    nodes = [helper.make_node("Slice", ["x", "starts", "ends"], ["s"], name="slice"),
             helper.make_node("Cast", ["s"], ["si"], name="cast", to=TensorProto.INT64),
             helper.make_node("Add", ["si", "big"], ["y"], name="add")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, [4])], [big, ends, starts])
    [finding] = check_trt_readiness(model).findings
    assert (finding.severity, finding.code, finding.node) == (Severity.WARNING, "int64-range", "add")
    assert "'big' holds values outside the INT32 range (1099511627776..1099511627776)" in finding.message


def test_fp16_risks_are_reported_only_when_fp16_is_asked():
    nodes = [helper.make_node("Exp", ["x"], ["e"], name="exp"),
             helper.make_node("Mul", ["e", "huge"], ["y"], name="mul")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 4])],
                       [numpy_helper.from_array(np.full((1, 4), 1e6, np.float32), "huge")])
    assert check_trt_readiness(model).findings == []
    found = check_trt_readiness(model, fp16=True).findings
    assert [(f.severity, f.code, f.node) for f in found] == [(Severity.WARNING, "fp16-precision", "exp"),
                                                            (Severity.WARNING, "fp16-range", None)]
    assert found[1].message == ("weight 'huge' holds |values| up to 1e+06, beyond float16's 65504: "
                                "they become inf in FP16")


@pytest.mark.parametrize(("opset", "severity", "fragment"), [
    (7, Severity.ERROR, "opset 7 is older than TensorRT parses (9..24)"),
    (21, Severity.INFO, "TensorRT 10.0 parses opsets up to 20"),
])
def test_opset_range(opset, severity, fragment):
    [finding] = check_trt_readiness(single_op("Relu", "r", opset=opset)).findings
    assert (finding.severity, finding.code) == (severity, "opset")
    assert fragment in finding.message


def test_readiness_reads_paths_through_the_safe_loader(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(single_op("Unique", "u").SerializeToString())
    assert codes(check_trt_readiness(path)) == ["unsupported-op"]
    with pytest.raises(InputError, match="no such file|does not exist"):
        check_trt_readiness(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------------------- shape profiles
def test_parse_shape_profile_three_shapes_or_one():
    assert parse_shape_profile("x:1x3x224x224,8x3x224x224,16x3x224x224") == (
        "x", ShapeProfile((1, 3, 224, 224), (8, 3, 224, 224), (16, 3, 224, 224)))
    assert parse_shape_profile("input:ids:1X128") == ("input:ids", ShapeProfile((1, 128), (1, 128), (1, 128)))
    assert str(ShapeProfile((1, 4), (2, 4), (8, 4))) == "1x4,2x4,8x4"
    assert parse_shape_profiles(["a:1x2", "b:1,2,3"]) == {"a": ShapeProfile((1, 2), (1, 2), (1, 2)),
                                                          "b": ShapeProfile((1,), (2,), (3,))}


@pytest.mark.parametrize(("text", "message"), [
    ("x", "expected NAME:MIN,OPT,MAX"),
    ("x:1x3,2x3", "expected NAME:MIN,OPT,MAX"),
    ("x:1xax3", "dims must be integers"),
    ("x:4x3,2x3,8x3", "need 0 < MIN <= OPT <= MAX in every dim (dims [0] are not)"),
    ("x:0x3", "need 0 < MIN <= OPT <= MAX"),
    ("x:1x3,1x3,1x3x1", "must have the same rank"),
])
def test_parse_shape_profile_errors(text, message):
    with pytest.raises(InputError) as info:
        parse_shape_profile(text)
    assert message in str(info.value)


def test_profile_given_twice_and_profile_problems():
    with pytest.raises(InputError, match="given twice"):
        parse_shape_profiles(["x:1x2", "x:1x2"])
    profile = ShapeProfile((1, 3), (4, 3), (8, 3))
    assert profile_problems(["N", 3], profile) == []
    assert profile_problems([None, 4], profile) == ["dim 1 is fixed to 4, the profile gives 3,3,3"]
    assert profile_problems(["N"], profile) == ["the profile has rank 2, the input has rank 1"]


# ----------------------------------------------------------------------------------------- version dispatch
def fake_trt_module(version: str, *, fp16: bool, int8: bool) -> SimpleNamespace:
    """Only for the version/feature helpers: a namespace with the attributes they read, no engine behind it."""
    flags = {"TF32": 1} | ({"FP16": 0} if fp16 else {}) | ({"INT8": 2} if int8 else {})
    return SimpleNamespace(__version__=version, BuilderFlag=SimpleNamespace(**flags),
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))


def test_trt_features_by_version():
    v10 = trt_features(fake_trt_module("10.3.0", fp16=True, int8=True))
    assert (v10.major, v10.fp16_flag, v10.int8_flag, v10.always_strongly_typed) == (10, True, True, False)
    v11 = trt_features(fake_trt_module("11.1.0.4", fp16=False, int8=False))
    assert (v11.major, v11.fp16_flag, v11.int8_flag, v11.always_strongly_typed) == (11, False, False, True)
    with pytest.raises(BackendUnavailable, match="TensorRT 8.6.1 is too old"):
        trt_features(fake_trt_module("8.6.1", fp16=True, int8=True))
    assert trt_major("10.0.1.6") == 10
    with pytest.raises(BackendUnavailable, match="cannot read the TensorRT version"):
        trt_major("unknown")


def test_network_flags_by_version():
    trt10 = fake_trt_module("10.8.0", fp16=True, int8=True)
    trt11 = fake_trt_module("11.0.0", fp16=False, int8=False)
    assert network_flags(trt10, trt_features(trt10), strongly_typed=False) == 0
    assert network_flags(trt10, trt_features(trt10), strongly_typed=True) == 1 << 1
    assert network_flags(trt11, trt_features(trt11), strongly_typed=True) == 0  # always on, flag ignored


def test_precision_flags_by_version():
    f10 = trt_features(fake_trt_module("10.8.0", fp16=True, int8=True))
    f11 = trt_features(fake_trt_module("11.0.0", fp16=False, int8=False))
    plain = {"model_has_qdq": False, "model_has_fp16": False}
    qdq = {"model_has_qdq": True, "model_has_fp16": False}
    assert precision_flags(f10, fp16=True, int8=False, strongly_typed=False, **plain) == ["FP16"]
    assert precision_flags(f10, fp16=True, int8=True, strongly_typed=False, **qdq) == ["FP16", "INT8"]
    assert precision_flags(f10, fp16=False, int8=False, strongly_typed=False, **qdq) == ["INT8"]
    assert precision_flags(f10, fp16=False, int8=True, strongly_typed=True, **qdq) == []
    assert precision_flags(f11, fp16=False, int8=True, strongly_typed=False, **qdq) == []
    assert precision_flags(f11, fp16=True, int8=False, strongly_typed=False, model_has_qdq=False,
                           model_has_fp16=True) == []
    for features in (f10, f11):
        with pytest.raises(InputError) as info:
            precision_flags(features, fp16=False, int8=True, strongly_typed=False, **plain)
        assert str(info.value) == INT8_NEEDS_QDQ
    with pytest.raises(InputError, match="TensorRT 11.0.0 removed BuilderFlag.FP16; convert the model to float16"):
        precision_flags(f11, fp16=True, int8=False, strongly_typed=False, **plain)
    with pytest.raises(InputError, match="strongly typed networks take precision from the model"):
        precision_flags(f10, fp16=True, int8=False, strongly_typed=True, **plain)


# ----------------------------------------------------------------------------------------- lazy import
def test_importing_irtool_and_the_backend_does_not_import_tensorrt():
    code = ("import json, sys\n"
            "import irtool, irtool.cli, irtool.backends.tensorrt, irtool.backends.trt_readiness\n"
            "print(json.dumps('tensorrt' in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) is False


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail as it does where TensorRT is not installed (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_without_tensorrt_raises_backend_unavailable_with_install_hint(no_tensorrt, tmp_path):
    runner = TrtRunner(cnn(batch=1))
    with pytest.raises(BackendUnavailable) as info:
        runner.build()
    assert str(info.value) == INSTALL_HINT
    assert info.value.exit_code == 2
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(BackendUnavailable):
        runner.save_engine(tmp_path / "x.plan")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"), TrtRunner(cnn(batch=1)):
        pass


def test_runner_options_are_validated_and_engine_files_checked(tmp_path):
    with pytest.raises(InputError, match="workspace must be at least 1 MB"):
        TrtRunner(cnn(), workspace_mb=0)
    runner = TrtRunner(cnn(), shapes={"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))})
    assert runner.shapes == {"x": ShapeProfile((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}
    with pytest.raises(InputError, match="no such engine file"):
        TrtRunner.load_engine(tmp_path / "missing.plan")
    (tmp_path / "empty.plan").write_bytes(b"")
    with pytest.raises(InputError, match="the engine file is empty"):
        TrtRunner.load_engine(tmp_path / "empty.plan")


# ----------------------------------------------------------------------------------------- CLI
@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here: build-engine would build")
def test_cli_build_engine_without_tensorrt_exits_2_and_writes_nothing(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(cnn(batch=1).SerializeToString())
    result = run_cli("build-engine", model, "-o", tmp_path / "x.plan", "--fp16", "--shapes", "x:1x3x16x16",
                     cwd=tmp_path)
    line = assert_one_line_error(result, 2)
    assert line == f"irtool: error: {INSTALL_HINT}"
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_cli_build_engine_checks_paths_and_shapes_before_tensorrt(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(cnn(batch=1).SerializeToString())
    assert_one_line_error(run_cli("build-engine", model, "-o", tmp_path), 2, "output path is a directory")
    assert_one_line_error(run_cli("build-engine", model, "-o", model), 2, "output is the input model")
    assert_one_line_error(run_cli("build-engine", model, "-o", tmp_path / "x.plan", "--shapes", "x:1x3,2x3"), 2,
                          "--shapes 'x:1x3,2x3': expected NAME:MIN,OPT,MAX")
    assert_one_line_error(run_cli("build-engine", model, "-o", tmp_path / "x.plan", "--workspace", "0"), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_cli_trt_check_text_ready_with_warning(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(cnn(batch="N").SerializeToString())
    result = run_cli("trt-check", model)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"trt-check {model}: ready (0 errors, 1 warning, 0 info)\n"
        "  warning  dynamic-shape          input 'x' has dynamic dims [N, 3, 16, 16]: TensorRT needs an optimization "
        "profile; give --shapes x:MIN,OPT,MAX (e.g. x:1x3x16x16,1x3x16x16,1x3x16x16)\n")
    with_profile = run_cli("trt-check", model, "--shapes", "x:1x3x16x16,4x3x16x16,8x3x16x16")
    assert with_profile.stdout == f"trt-check {model}: ready (0 errors, 0 warnings, 0 info)\n"


def test_cli_trt_check_json_not_ready_exits_1(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(single_op("Unique", "uniq").SerializeToString())
    result = run_cli("trt-check", model, "--json")
    assert_one_line_error(result, 1)
    assert result.stderr == f"irtool: error: {model} is not TensorRT-ready: 1 error finding(s)\n"
    assert json.loads(result.stdout) == {
        "model": str(model), "ready": False, "opset": 17, "counts": {"error": 1, "warning": 0, "info": 0},
        "findings": [{"severity": "error", "code": "unsupported-op", "node": "uniq",
                      "message": "node 'uniq' (Unique): not supported by TensorRT's ONNX parser "
                                 "(onnx-tensorrt support matrix)"}]}


def test_cli_trt_check_uint8_model(tmp_path):
    model = tmp_path / "u8.onnx"
    model.write_bytes(quantized_cnn("ort-cpu").SerializeToString())
    result = run_cli("trt-check", model, "--json", "--shapes", "x:1x3x16x16")
    data = json.loads(result.stdout)
    assert result.returncode == 1
    assert data["ready"] is False
    assert data["counts"] == {"error": 14, "warning": 0, "info": 0}
    # ort-cpu stores biases as int32 for ONNX Runtime; TensorRT takes no int32 DequantizeLinear (qdq-type).
    assert {f["code"] for f in data["findings"]} == {"uint8-qdq", "zero-point", "qdq-type"}


# ----------------------------------------------------------------------------------------- GPU (skipped here)
def _ort(model: onnx.ModelProto, feeds):
    from irtool.backends.ort import run

    return run(model, feeds)


def _gpu_runner_or_skip(model, **options) -> TrtRunner:
    pytest.importorskip("tensorrt")
    runner = TrtRunner(model, **options)
    try:
        return runner.build()
    except BackendUnavailable as e:  # TensorRT importable but no usable GPU / cuda-python
        pytest.skip(str(e))


@pytest.mark.gpu
def test_gpu_fp32_engine_matches_onnxruntime():
    model = cnn(batch=2)
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    with _gpu_runner_or_skip(model) as runner:
        out = runner.infer({"x": x})
    assert list(out) == ["y"] and out["y"].shape == (2, 4) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], _ort(model, {"x": x})["y"], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_dynamic_batch_profile_runs_every_batch_in_range_and_rejects_others():
    model = cnn(batch="N")
    shapes = {"x": ShapeProfile((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    with _gpu_runner_or_skip(model, shapes=shapes) as runner:
        for batch in (1, 5, 8):
            x = RNG.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            np.testing.assert_allclose(runner.infer({"x": x})["y"], _ort(model, {"x": x})["y"], rtol=1e-3, atol=1e-3)
        with pytest.raises(InputError, match="does not fit the engine"):
            runner.infer({"x": np.zeros((9, 3, 16, 16), np.float32)})
        with pytest.raises(InputError, match="missing \\['x'\\]"):
            runner.infer({})


@pytest.mark.gpu
def test_gpu_dynamic_input_without_profile_is_refused():
    pytest.importorskip("tensorrt")
    with pytest.raises((InputError, BackendUnavailable)) as info:
        TrtRunner(cnn(batch="N")).build_plan()
    if isinstance(info.value, BackendUnavailable):
        pytest.skip(str(info.value))
    assert "need a profile" in str(info.value) and "--shapes" in str(info.value)


@pytest.mark.gpu
def test_gpu_int8_engine_from_trt_qdq_agrees_with_onnxruntime():
    model = quantized_cnn("trt")
    x = RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)
    shapes = {"x": ShapeProfile((4, 3, 16, 16), (4, 3, 16, 16), (4, 3, 16, 16))}
    with _gpu_runner_or_skip(model, int8=True, shapes=shapes) as runner:
        out = runner.infer({"x": x})["y"]
    ref = _ort(model, {"x": x})["y"]
    sqnr = 10 * np.log10((ref ** 2).sum() / max(((ref - out) ** 2).sum(), 1e-30))
    assert sqnr > 25.0


@pytest.mark.gpu
def test_gpu_save_load_engine_and_timing_cache(tmp_path):
    model = cnn(batch=1)
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    cache = tmp_path / "timing.cache"
    runner = _gpu_runner_or_skip(model, timing_cache=cache)
    expected = runner.infer({"x": x})["y"]
    runner.save_engine(tmp_path / "m.plan")
    runner.close()
    assert cache.stat().st_size > 0
    with TrtRunner.load_engine(tmp_path / "m.plan") as loaded:
        np.testing.assert_array_equal(loaded.infer({"x": x})["y"], expected)


@pytest.mark.gpu
def test_gpu_parser_error_names_the_node():
    pytest.importorskip("tensorrt")
    with pytest.raises((InputError, BackendUnavailable)) as info:
        TrtRunner(single_op("Unique", "uniq")).build_plan()
    if isinstance(info.value, BackendUnavailable):
        pytest.skip(str(info.value))
    assert str(info.value).startswith("TensorRT cannot parse the model: node 'uniq' (Unique)")


def test_backend_module_exposes_the_runner_protocol():
    for method in ("build", "infer", "close", "build_plan", "save_engine", "load_engine", "__enter__", "__exit__"):
        assert callable(getattr(TrtRunner, method))
    assert trt_backend.TrtRunner(cnn()).name == "tensorrt"


def test_cli_help_lists_trt_commands():
    result = run_cli("--help")
    assert "  trt-check " in result.stdout and "  build-engine " in result.stdout
    assert Path(trt_backend.__file__).name == "tensorrt.py"
