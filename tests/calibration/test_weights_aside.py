"""Calibration sessions take the large weights from the IR's arrays, in place; channel means pool in the graph."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from irtool.calibration.schedule import calibration_session, session_with_weights
from irtool.calibration.tap import channel_means, pooled_proto
from irtool.ir.convert import WEIGHTS_IN_MEMORY
from irtool.ir.model import Model

RNG = np.random.default_rng(0)


def _conv_net(batch: int | str = 2) -> onnx.ModelProto:
    """Conv 16 -> 32 (4608 weights), Relu, GlobalAveragePool, Flatten, Gemm 32 -> 40 (1280 weights); a bfloat16
    table and an int64 index table, both large, beside it."""
    w = RNG.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1
    g = RNG.standard_normal((40, 32)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1),
             helper.make_node("Cast", ["bf"], ["bf32"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["bf32", "idx"], ["t"])]
    bf16 = helper.make_tensor("bf", TensorProto.BFLOAT16, [2048], np.arange(2048, dtype=np.float32) / 7,
                              raw=False)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(32, np.float32), "b"),
             numpy_helper.from_array(g, "g"), numpy_helper.from_array(np.full(40, 0.5, np.float32), "gb"),
             bf16, numpy_helper.from_array(np.arange(2000, dtype=np.int64) % 2048, "idx")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 40]),
                               helper.make_tensor_value_info("t", TensorProto.FLOAT, [2000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 16, 8, 8)).astype(np.float32)}


def test_large_plain_weights_stay_out_of_the_proto_and_come_back_as_arrays():
    source = _conv_net()
    weights: dict[str, np.ndarray] = {}
    proto = Model.from_proto(source).to_proto(weights)
    inits = {t.name: t for t in proto.graph.initializer}
    assert sorted(weights) == ["g", "idx", "w"]  # large and plain; the bfloat16 table is exported whole
    for name in weights:
        tensor = inits[name]
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
        assert {e.key: e.value for e in tensor.external_data} == {"location": WEIGHTS_IN_MEMORY}
        original = numpy_helper.to_array(next(t for t in source.graph.initializer if t.name == name))
        np.testing.assert_array_equal(weights[name], original)
        assert list(tensor.dims) == list(original.shape) and weights[name].flags.c_contiguous
    assert inits["bf"] == next(t for t in source.graph.initializer if t.name == "bf")
    assert inits["b"].raw_data and inits["gb"].raw_data  # small: inline, where shape inference can read them
    assert sum(len(t.raw_data) for t in proto.graph.initializer) < 5000


def test_arrays_edited_in_the_ir_are_handed_over_too():
    """After a pass replaced a weight by a numpy array (not a lazily read proto), that array is what the session
    gets."""
    model = Model.from_proto(_conv_net())
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    conv.inputs[1].values = conv.inputs[1].values * 2
    weights: dict[str, np.ndarray] = {}
    model.to_proto(weights)
    np.testing.assert_array_equal(weights["w"], conv.inputs[1].values)


def test_a_session_given_the_weights_computes_what_the_whole_proto_computes():
    model = Model.from_proto(_conv_net())
    plain = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    weights: dict[str, np.ndarray] = {}
    aside = session_with_weights(model.to_proto(weights), ort.SessionOptions(), weights)
    scheduled = calibration_session(model.to_proto(weights), ["y", "t"], weights=weights)
    for seed in range(3):
        want = plain.run(None, _feeds(seed))
        for session in (aside, scheduled):
            for got, ref in zip(session.run(None, _feeds(seed)), want, strict=True):
                np.testing.assert_array_equal(got, ref)


def test_the_session_keeps_the_arrays_alive():
    """ONNX Runtime may read the arrays in place (where it does not prepack or transform a weight) and holds no
    reference to them: the session does, so the caller's dict may go away (a lazily read model's arrays exist
    nowhere else)."""
    model = Model.from_proto(_conv_net())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no transformed copies either
    want = ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"]
                                ).run(None, _feeds(1))
    weights: dict[str, np.ndarray] = {}
    session = session_with_weights(model.to_proto(weights), options, weights)
    alive = [weakref.ref(array) for array in weights.values()]
    del weights
    gc.collect()
    assert all(ref() is not None for ref in alive)
    litter = [np.full(4608, 1e30, np.float32) for _ in range(200)]
    for got, ref in zip(session.run(None, _feeds(1)), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    assert len(litter) == 200


def test_channel_means_pool_conv_inputs_in_graph_and_weigh_every_sample_alike():
    """Conv inputs are averaged per sample by a pool in the graph, the Gemm's [N, K] input comes out whole; with
    batches of 3 and 1 samples the result is the mean over all four samples (float64 reference), and the session
    fetches no whole [N, C, H, W] tensor."""
    model = Model.from_proto(_conv_net(batch="N"))
    batches = [{"x": np.concatenate([_feeds(s)["x"] for s in (1, 2)])[:3]}, {"x": _feeds(3)["x"][:1]}]
    axes = {"x": 1, "r": 1, "f": -1}
    proto, pooled = pooled_proto(model, axes, {})
    assert sorted(pooled) == ["r", "x"] and "r" not in {o.name for o in proto.graph.output}
    reference = ort.InferenceSession(_with_outputs(model, ["r", "f"]), providers=["CPUExecutionProvider"])
    everything = {"x": [], "r": [], "f": []}
    for batch in batches:
        r, f = reference.run(["r", "f"], batch)
        everything["x"].append(batch["x"])
        everything["r"].append(r)
        everything["f"].append(f)
    got = channel_means(model, axes, batches)
    for name, axis in axes.items():
        values = np.concatenate(everything[name]).astype(np.float64)
        want = values.mean(axis=tuple(i for i in range(values.ndim) if i != axis % values.ndim))
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


def _with_outputs(model: Model, names: list[str]) -> bytes:
    proto = model.to_proto()
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return proto.SerializeToString()


def test_channel_means_of_nothing_is_empty():
    """ONNX Runtime returns every output when asked for none: no value names, no run (bias-correct on a
    transformer whose layers are MatMul + Add)."""
    model = Model.from_proto(_conv_net())
    assert channel_means(model, {}, [_feeds(0)]) == {}


def test_channel_means_of_token_values_sum_in_graph_and_weigh_every_token_alike():
    """[batch, tokens, features] values (a transformer's linear-layer inputs) are summed over the tokens in the
    graph and come out as [batch, features] with their shape; with batches of different sizes and token counts
    the result is the mean over every token (float64 reference), not over samples."""
    w = RNG.standard_normal((8, 12)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    batches = [{"x": RNG.standard_normal((3, 2, 8)).astype(np.float32) + 0.5},
               {"x": RNG.standard_normal((1, 9, 8)).astype(np.float32) - 0.5}]
    axes = {"x": -1, "r": -1}
    proto, reduced = pooled_proto(model, axes, {})
    outputs = {o.name for o in proto.graph.output}
    assert sorted(reduced) == ["r", "x"] and not {"r", "x"} & outputs
    assert all(reduced[n].sums in outputs and reduced[n].shape in outputs for n in axes)
    got = channel_means(model, axes, batches)
    xs = np.concatenate([b["x"].reshape(-1, 8) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(got["x"], xs.mean(0), rtol=1e-6, atol=1e-7)
    rs = np.maximum(xs @ w.astype(np.float64), 0.0)
    np.testing.assert_allclose(got["r"], rs.mean(0), rtol=1e-5, atol=1e-6)
