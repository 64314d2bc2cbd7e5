"""fold-bn: numerical equivalence for every producer (and the channel layout of each), weights shared
with another node, and every case where the pass must decline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.passes.helpers import assert_same_outputs, model_of, ops, run

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _bn_inits(rng, channels: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    values = {"gamma": rng.uniform(0.5, 1.5, channels), "beta": rng.normal(0, 0.5, channels),
              "mean": rng.normal(0, 0.5, channels), "var": rng.uniform(0.5, 2.0, channels)}
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()]


def _bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    params = [f"{prefix}_{k}" for k in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x] + params, [y], name=prefix, **attrs)


def _proto(nodes, inits, x_shape, outputs: dict[str, list[int]]) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, x_shape)],
                              [value(n, TensorProto.FLOAT, s) for n, s in outputs.items()], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _producer_case(op: str, group: int, bias: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    if op == "Conv":
        c_in, c_out = 4, 6 if group != 4 else 4
        w = rng.normal(0, 0.3, (c_out, c_in // group, 3, 3))
        x_shape, y_shape, attrs = [1, c_in, 5, 5], [1, c_out, 5, 5], {"group": group, "pads": [1, 1, 1, 1]}
    else:
        c_in, c_out = 4, 3 * group
        w = rng.normal(0, 0.3, (c_in, c_out // group, 3, 3))
        x_shape, y_shape, attrs = [1, c_in, 4, 4], [1, c_out, 9, 9], {"group": group, "strides": [2, 2]}
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")] + _bn_inits(rng, c_out)
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["c"], name="p", **attrs), _bn_node("c", "y")]
    return _proto(nodes, inits, x_shape, {"y": y_shape})


@pytest.mark.parametrize("op,group", [("Conv", 1), ("Conv", 2), ("Conv", 4), ("ConvTranspose", 1),
                                      ("ConvTranspose", 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_family_folds_and_matches(op, group, bias):
    model = model_of(_producer_case(op, group, bias))
    original = model.copy()
    records = run(model, "fold-bn")
    assert records[0].stats == {"bn_folded": 1, "affine_folded": 0}
    assert ops(model) == [op]
    producer = model.graph.nodes[0]
    assert producer.outputs[0].name == "y" and len(producer.inputs) == 3
    assert_same_outputs(original, model, **TOL)


def _gemm_case(trans_b: int, c_shape: list[int] | None, seed: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b = rng.normal(0, 0.3, (4, 5) if trans_b else (5, 4))
    inits = [numpy_helper.from_array(b.astype(np.float32), "B")] + _bn_inits(rng, 4)
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, c_shape).astype(np.float32), "C"))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.5),
             _bn_node("g", "y")]
    return _proto(nodes, inits, [3, 5], {"y": [3, 4]})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [4], [1, 4], [3, 4], []])
def test_gemm_folds_for_every_bias_broadcast(trans_b, c_shape):
    model = model_of(_gemm_case(trans_b, c_shape))
    original = model.copy()
    assert run(model, "fold-bn")[0].stats == {"bn_folded": 1, "affine_folded": 0}
    gemm = model.graph.nodes[0]
    assert gemm.op == "Gemm" and gemm.attrs["beta"] == 1.0 and gemm.attrs["alpha"] == pytest.approx(0.7)
    assert_same_outputs(original, model, **TOL)


def test_shared_weight_is_not_changed_under_the_other_reader():
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w")] + _bn_inits(rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), _bn_node("c1", "y1"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2")]
    model = model_of(_proto(nodes, inits, [1, 4, 3, 3], {"y1": [1, 4, 3, 3], "y2": [1, 4, 3, 3]}))
    original = model.copy()
    assert run(model, "fold-bn")[0].stats == {"bn_folded": 1, "affine_folded": 0}
    conv1, conv2 = model.graph.nodes
    assert conv2.inputs[1].name == "w" and conv1.inputs[1].name == "w_bn"
    assert_same_outputs(original, model, **TOL)


def test_new_weight_names_avoid_existing_ones():
    proto = _producer_case("Conv", 1, True)
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "w_bn"))
    proto.graph.node.append(helper.make_node("Identity", ["w_bn"], ["w_bn_out"], name="keep"))
    proto.graph.output.append(helper.make_tensor_value_info("w_bn_out", TensorProto.FLOAT, [1]))
    model = model_of(proto)
    run(model, "fold-bn")
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    assert conv.inputs[1].name == "w_bn_1"


def _declines(proto_or_text) -> None:
    model = model_of(proto_or_text)
    before = ops(model)
    records = run(model, "fold-bn")
    assert records[0].modified is False and records[0].stats == {"bn_folded": 0, "affine_folded": 0}
    assert ops(model) == before


def test_declines_when_conv_output_has_two_readers():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), "w")] + _bn_inits(rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn_node("c", "y"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    _declines(_proto(nodes, inits, [1, 3, 2, 2], {"y": [1, 4, 2, 2], "r": [1, 4, 2, 2]}))


def test_declines_in_training_mode():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), "w")] + _bn_inits(rng, 4)
    bn = helper.make_node("BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
                          ["y", "rm", "rv"], name="bn", training_mode=1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn]
    _declines(_proto(nodes, inits, [2, 3, 2, 2], {"y": [2, 4, 2, 2], "rm": [4], "rv": [4]}))


def test_declines_after_a_non_linear_producer():
    _declines("""
    g (float[1,2,2,2] x) => (float[1,2,2,2] y) <float[2] s = {1.0, 2.0}, float[2] b = {0.0, 1.0},
        float[2] m = {0.5, 0.5}, float[2] v = {1.0, 1.0}> {
      r = Relu(x)
      y = BatchNormalization(r, s, b, m, v)
    }""")


def test_declines_when_bn_parameters_are_not_constants():
    _declines("""
    g (float[1,2,2,2] x, float[2] s) => (float[1,2,2,2] y) <float[2,2,1,1] w = {1.0, 0.0, 0.0, 1.0},
        float[2] b = {0.0, 1.0}, float[2] m = {0.5, 0.5}, float[2] v = {1.0, 1.0}> {
      c = Conv(x, w)
      y = BatchNormalization(c, s, b, m, v)
    }""")


def test_declines_when_weight_is_computed_at_runtime():
    _declines("""
    g (float[1,2,2,2] x, float[2,2,1,1] w) => (float[1,2,2,2] y) <float[2] s = {1.0, 2.0},
        float[2] b = {0.0, 1.0}, float[2] m = {0.5, 0.5}, float[2] v = {1.0, 1.0}> {
      c = Conv(x, w)
      y = BatchNormalization(c, s, b, m, v)
    }""")


def test_folds_inside_an_if_branch():
    model = model_of("""
    g (float[1,2,2,2] x, bool k) => (float[1,2,2,2] y) <float[2,2,1,1] w = {1.0, 0.5, -0.5, 1.0},
        float[2] s = {1.0, 2.0}, float[2] b = {0.0, 1.0}, float[2] m = {0.5, 0.5}, float[2] v = {1.0, 3.0}> {
      y = If(k) <then_branch = t () => (float[1,2,2,2] ty) {
          c = Conv(x, w)
          ty = BatchNormalization(c, s, b, m, v)
        }, else_branch = e () => (float[1,2,2,2] ey) { ey = Neg(x) }>
    }""")
    original = model.copy()
    assert run(model, "fold-bn")[0].stats == {"bn_folded": 1, "affine_folded": 0}
    assert "BatchNormalization" not in ops(model)
    assert_same_outputs(original, model, **TOL)


# --------------------------------------------------------------------------- per-channel affine ops
def _affine_case(follow: list[tuple[str, np.ndarray, bool]], producer: str = "Conv", seed: int = 5) -> onnx.ModelProto:
    """x -> producer (no bias) -> each (op, constant, constant first) in turn -> Relu -> y."""
    rng = np.random.default_rng(seed)
    if producer == "Conv":
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="p", pads=[1, 1, 1, 1])]
        x_shape, y_shape = [2, 3, 5, 5], [2, 4, 5, 5]
    else:
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 6)).astype(np.float32), "w")]
        nodes = [helper.make_node("Gemm", ["x", "w"], ["t0"], name="p", transB=1)]
        x_shape, y_shape = [2, 6], [2, 4]
    for i, (op, value, constant_first) in enumerate(follow):
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"v{i}"))
        operands = [f"v{i}", f"t{i}"] if constant_first else [f"t{i}", f"v{i}"]
        nodes.append(helper.make_node(op, operands, [f"t{i + 1}"], name=f"{op.lower()}{i}"))
    nodes.append(helper.make_node("Relu", [f"t{len(follow)}"], ["y"], name="relu"))
    return _proto(nodes, inits, x_shape, {"y": y_shape})


CHANNELS = np.array([0.5, -2.0, 1.5, 3.0])


@pytest.mark.parametrize("follow", [
    [("Mul", CHANNELS.reshape(4, 1, 1), False), ("Add", CHANNELS.reshape(1, 4, 1, 1) - 1, False)],  # decomposed BN
    [("Mul", CHANNELS.reshape(4, 1, 1), True), ("Sub", CHANNELS.reshape(4, 1, 1), True)],  # v·y, then v − y
    [("Div", CHANNELS.reshape(1, 4, 1, 1), False), ("Sub", np.array(0.25), False)],  # y/v, y − scalar
    [("Add", np.array([[[[0.75]]]]), False)],  # one value, at the output's rank
], ids=["mul-add", "mul-first-sub-reversed", "div-sub-scalar", "add-scalar-4d"])
def test_per_channel_affine_ops_fold_into_the_conv(follow):
    model = model_of(_affine_case(follow))
    original = model.copy()
    assert run(model, "fold-bn")[0].stats == {"bn_folded": 0, "affine_folded": len(follow)}
    assert ops(model) == ["Conv", "Relu"]
    assert_same_outputs(original, model, **TOL)


def test_gemm_takes_a_bias_add_and_a_scale_and_a_batchnorm_after_them():
    rng = np.random.default_rng(6)
    proto = _affine_case([("Add", CHANNELS.reshape(1, 4), False), ("Mul", CHANNELS, False)], producer="Gemm")
    # ... and a BatchNormalization after the Mul: the chain folds in one run, in graph order
    proto.graph.initializer.extend(_bn_inits(rng, 4))
    relu = proto.graph.node[-1]
    relu.input[0] = "bn_out"
    proto.graph.node.insert(len(proto.graph.node) - 1, _bn_node("t2", "bn_out"))
    model = model_of(proto)
    original = model.copy()
    assert run(model, "fold-bn")[0].stats == {"bn_folded": 1, "affine_folded": 2}
    assert ops(model) == ["Gemm", "Relu"]
    assert_same_outputs(original, model, **TOL)


@pytest.mark.parametrize("follow", [
    [("Add", np.arange(5.0), False)],  # [5]: broadcasts along the width, not the channels
    [("Mul", np.ones((1, 1, 4, 1, 1)), False)],  # raises the output's rank
    [("Mul", CHANNELS.reshape(4, 1, 1) * np.ones((4, 5, 1)), False)],  # varies along the height
    [("Div", CHANNELS.reshape(4, 1, 1), True)],  # v / y is not affine
    [("Div", np.array([1.0, 0.0, 1.0, 1.0]).reshape(4, 1, 1), False)],  # a zero divisor: infinite scale
], ids=["width", "rank", "height", "reciprocal", "zero-divisor"])
def test_affine_ops_that_are_not_per_channel_stay(follow):
    proto = _affine_case(follow)
    if follow[0][1].ndim == 5:  # the rank case makes y 5-D
        proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 5, 5]))
    _declines(proto)


def test_a_second_reader_of_the_conv_output_keeps_the_add():
    proto = _affine_case([("Add", CHANNELS.reshape(4, 1, 1), False)])
    proto.graph.node.append(helper.make_node("Neg", ["t0"], ["n"], name="neg"))
    proto.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 4, 5, 5]))
    _declines(proto)
