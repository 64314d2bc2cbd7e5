"""ONNX Runtime backend: results against numpy, input generation, benchmark, compare metrics, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.backends import ort as backend
from irtool.backends.ort import OrtRunner, benchmark, compare, make_inputs, run
from irtool.errors import InputError, IrtoolError
from irtool.ir import Model
from irtool.ir import io as ir_io

F = TensorProto.FLOAT
RNG_W = np.random.default_rng(42).standard_normal((6, 4)).astype(np.float32)


def linear(weight: np.ndarray = RNG_W, batch="N", ir_version: int = 8) -> onnx.ModelProto:
    """y = x @ W, logits = Softmax(y); x: [batch, 6]."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Softmax", ["y"], ["p"], name="sm", axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [batch, 6])],
                              [helper.make_tensor_value_info("y", F, [batch, 4]),
                               helper.make_tensor_value_info("p", F, [batch, 4])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def softmax(y: np.ndarray) -> np.ndarray:
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------- run
@pytest.mark.parametrize("form", ["proto", "model", "path"])
def test_run_matches_numpy(form, tmp_path):
    proto = linear()
    model = {"proto": proto, "model": Model.from_proto(proto)}.get(form)
    if form == "path":
        model = tmp_path / "m.onnx"
        onnx.save(proto, model)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    out = run(model, {"x": x})
    assert list(out) == ["y", "p"]
    np.testing.assert_allclose(out["y"], x @ RNG_W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["p"], softmax(x @ RNG_W), rtol=1e-5, atol=1e-6)


def test_runner_accepts_ir_version_newer_than_onnxruntime_and_leaves_model_alone():
    proto = linear(ir_version=onnx.IR_VERSION)
    x = np.ones((1, 6), np.float32)
    out = run(proto, {"x": x})
    np.testing.assert_allclose(out["y"], x @ RNG_W, rtol=1e-5)
    assert proto.ir_version == onnx.IR_VERSION


def test_runner_protocol_build_is_idempotent_and_specs():
    runner = OrtRunner(linear(batch="N"), threads=1)
    assert runner._session is None          # construction is lazy
    assert runner.build() is runner.build()
    session = runner._session
    runner.build()
    assert runner._session is session
    assert runner.input_specs() == [("x", np.dtype(np.float32), [None, 6])]
    assert runner.output_names() == ["y", "p"]
    runner.close()
    assert runner._session is None


def test_large_model_path_uses_external_data(monkeypatch):
    # Stand-in for a >2 GB model: the session must come from a temp folder with external data.
    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", 64)
    weight = np.random.default_rng(1).standard_normal((6, 400)).astype(np.float32)
    proto = linear(weight)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 400
    proto.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 400
    x = np.ones((2, 6), np.float32)
    with OrtRunner(proto) as runner:
        tmp = runner._tmp_dir
        assert tmp is not None and (tmp / "model.onnx.data").stat().st_size == weight.nbytes
        np.testing.assert_allclose(runner.infer({"x": x})["y"], x @ weight, rtol=1e-5, atol=1e-5)
    assert not tmp.exists()


# ----------------------------------------------------------------------------------------- errors
def test_wrong_feed_names_raise_input_error():
    with OrtRunner(linear()) as runner:
        with pytest.raises(InputError, match=r"missing \['x'\], unknown \['z'\]"):
            runner.infer({"z": np.ones((1, 6), np.float32)})


@pytest.mark.parametrize("value, pattern", [
    (np.ones((1, 5), np.float32), "invalid dimensions"),
    (np.ones((1, 6), np.int64), "data type"),
])
def test_wrong_feed_shape_or_dtype_raise_one_line_input_error(value, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        run(linear(), {"x": value})
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None


def test_bad_model_raises_input_error_with_cause():
    proto = linear()
    proto.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="onnxruntime cannot load the model") as info:
        OrtRunner(proto).build()
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    assert isinstance(info.value, IrtoolError)


def test_bad_optimization_level():
    with pytest.raises(InputError, match="optimization level"):
        OrtRunner(linear(), optimization_level="max").build()


def test_missing_path_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        run(tmp_path / "absent.onnx", {})


def test_optimized_model_is_written(tmp_path):
    target = tmp_path / "opt.onnx"
    with OrtRunner(linear(), optimized_model_path=str(target)) as runner:
        runner.infer({"x": np.ones((1, 6), np.float32)})
    assert onnx.load(target).graph.node


# ----------------------------------------------------------------------------------------- inputs
def mixed_inputs_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"], name=f"id_{n}") for n in ("f", "i", "b")]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("f", F, ["batch", 3, "h"]),
        helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 5]),
        helper.make_tensor_value_info("b", TensorProto.BOOL, [7]),
    ], [helper.make_tensor_value_info(f"{n}_out", t, None)
        for n, t in (("f", F), ("i", TensorProto.INT64), ("b", TensorProto.BOOL))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_make_inputs_is_deterministic_and_typed():
    first = make_inputs(mixed_inputs_model(), seed=3)
    again = make_inputs(mixed_inputs_model(), seed=3)
    other = make_inputs(mixed_inputs_model(), seed=4)
    assert {k: (v.dtype, v.shape) for k, v in first.items()} == {
        "f": (np.float32, (1, 3, 1)), "i": (np.int64, (1, 5)), "b": (np.bool_, (7,))}
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["f"], other["f"])
    assert first["i"].min() >= 0 and first["i"].max() < backend.INT_INPUT_HIGH


def test_make_inputs_resolves_symbolic_dims():
    feeds = make_inputs(mixed_inputs_model(), batch=4, input_shapes={"f": [2, 3, 9]})
    assert feeds["f"].shape == (2, 3, 9)     # explicit shape wins over batch
    assert feeds["i"].shape == (2, 5)        # and its named batch binds i's too (tests/test_shared_dim_names.py)
    assert make_inputs(mixed_inputs_model(), batch=4)["i"].shape == (4, 5)
    floats = make_inputs(linear(), seed=0, input_shapes={"x": [256, 6]})["x"]
    assert abs(float(floats.mean())) < 0.1 and 0.9 < float(floats.std()) < 1.1


@pytest.mark.parametrize("kwargs, pattern", [
    ({"strict": True}, r"input 'f': dim 0 \(batch\) is symbolic"),
    ({"input_shapes": {"nope": [1]}}, "not model inputs"),
    ({"input_shapes": {"f": [1, 3]}}, "rank 2"),
    ({"input_shapes": {"f": [1, 4, 2]}}, "dim 1 is fixed to 3"),
])
def test_make_inputs_errors(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        make_inputs(mixed_inputs_model(), **kwargs)


def test_make_inputs_unknown_rank_needs_a_shape():
    proto = mixed_inputs_model()
    proto.graph.input[2].type.tensor_type.ClearField("shape")
    with pytest.raises(InputError, match="'b' has no shape"):
        make_inputs(proto)
    assert make_inputs(proto, input_shapes={"b": [2, 2]})["b"].shape == (2, 2)


# ----------------------------------------------------------------------------------------- benchmark
def test_benchmark_fields_are_sane():
    result = benchmark(linear(), warmup=2, runs=20, threads=1)
    assert result.runs == 20 and result.threads == 1
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms
    assert set(result.to_dict()) == {"median_ms", "p90_ms", "mean_ms", "min_ms", "runs", "threads"}


def test_benchmark_rejects_zero_runs():
    with pytest.raises(InputError, match="runs >= 1"):
        benchmark(linear(), runs=0)


# ----------------------------------------------------------------------------------------- compare
def test_compare_identical_models():
    result = compare(linear(), Model.from_proto(linear()), samples=2, input_shapes={"x": [8, 6]})
    assert result.ok and result.samples == 2
    for diff in result.outputs.values():
        assert diff.max_abs == 0.0 and diff.sqnr_db == math.inf and diff.cosine == pytest.approx(1.0)
        assert diff.top1_agreement == 1.0 and diff.shape_a == [8, 4]
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["outputs"]["y"]["sqnr_db"] == "inf"


def test_compare_weights_scaled_by_one_percent():
    # y_b = 1.01·y_a exactly (up to float32 rounding): error is 0.01·y_a, so SQNR = 10·log10(1e4) = 40 dB
    result = compare(linear(), linear(RNG_W * np.float32(1.01)), input_shapes={"x": [64, 6]})
    y = result.outputs["y"]
    assert y.sqnr_db == pytest.approx(40.0, abs=0.01)
    x = make_inputs(linear(), input_shapes={"x": [64, 6]})["x"]
    assert y.max_abs == pytest.approx(0.01 * np.abs(x @ RNG_W).max(), rel=1e-3)
    # near-zero outputs cancel in float32, so elementwise relative error is only about 1%
    assert y.max_rel == pytest.approx(0.01, rel=0.1)
    assert y.cosine == pytest.approx(1.0, abs=1e-9)
    assert y.top1_agreement == 1.0        # scaling keeps every argmax
    assert not y.ok                       # 1% is beyond rtol=1e-3
    assert result.outputs["p"].sqnr_db > y.sqnr_db - 10   # softmax sharpens a little, still close
    assert not result.ok and result.worst == "y"


def test_compare_sign_flip_breaks_top1_and_cosine():
    result = compare(linear(), linear(-RNG_W), input_shapes={"x": [32, 6]})
    y = result.outputs["y"]
    assert y.cosine == pytest.approx(-1.0, abs=1e-6)
    assert y.sqnr_db == pytest.approx(10 * math.log10(1 / 4), abs=1e-3)   # error is 2·y_a
    assert y.top1_agreement < 0.2


def test_compare_uses_given_feeds():
    feeds = {"x": np.zeros((1, 6), np.float32)}
    result = compare(linear(), linear(RNG_W * 2), feeds=feeds)
    assert result.samples == 1 and result.outputs["y"].max_abs == 0.0 and result.ok


def test_compare_rejects_models_with_different_interfaces():
    other = linear()
    other.graph.output[1].name = "probs"
    other.graph.node[1].output[0] = "probs"
    with pytest.raises(InputError, match=r"outputs differ: only in the first \['p'\], only in the second \['probs'\]"):
        compare(linear(), other)
