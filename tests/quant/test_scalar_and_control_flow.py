"""Models beyond one batched tensor in, one out: a scalar input (a diffusion timestep, a threshold), an If whose
branches read the outer graph's tensors, and nodes that share a name. Calibration used to refuse the scalar input
("calibration batches need a leading batch axis"), and the If model broke calibration (ONNX Runtime saved its
optimized branches with one reorder name twice) and prune (a channel the branches read was removed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes.quant.calibrate import METADATA_KEY
from tests.quant.ort_run import intermediate_values, run_batches


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)


def scaled_mlp() -> onnx.ModelProto:
    """y = MatMul(Relu(MatMul(x, w1) * s), w2) with s a scalar float input."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
             helper.make_node("Relu", ["hs"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [_weight(rng, "w1", 8, 16), _weight(rng, "w2", 16, 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def mlp_samples(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(8).astype(np.float32), "s": np.array(s, np.float32)}
            for s in rng.choice([0.5, 2.0, 3.0], count)]


def _ranges(result) -> dict[str, list[float]]:
    return json.loads(result.model.metadata[METADATA_KEY])["ranges"]


def test_a_scalar_input_is_calibrated_sample_by_sample_whatever_the_batch_size():
    """Samples with different scales are never batched together, so the minmax range of Relu(h * s) is the
    exact one over all samples, and the same at batch sizes 1 and 16."""
    data = mlp_samples(40)
    small = optimize(scaled_mlp(), "calibrate{method=minmax}", calibration_data=data, calib_batch_size=1)
    large = optimize(scaled_mlp(), "calibrate{method=minmax}", calibration_data=data, calib_batch_size=16)
    assert _ranges(small) == _ranges(large)
    batches = [{"x": d["x"][None], "s": d["s"]} for d in data]
    r = intermediate_values(scaled_mlp(), ["r"], batches)["r"]
    assert _ranges(large)["r"] == pytest.approx([0.0, float(r.max())], rel=1e-6)


def test_a_model_with_a_scalar_input_quantizes_within_its_budget():
    result = optimize(scaled_mlp(), "quant", calibration_data=mlp_samples(64))
    quantized = result.model.to_proto()
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 2
    test = mlp_samples(48, seed=7)
    for scale in (0.5, 3.0):
        batch = [{"x": np.stack([d["x"] for d in test]), "s": np.array(scale, np.float32)}]
        ref, got = run_batches(scaled_mlp(), batch), run_batches(quantized, batch)
        assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 30


def branching_convs() -> onnx.ModelProto:
    """x -> conv0 (8) -> Relu -> conv1 (8) -> Relu -> r1; If(cond) runs a 1x1 conv on r1 in either branch, each
    with its own weights (read from the outer graph, as torch exports them)."""
    rng = np.random.default_rng(2)

    def branch(name: str, weight: str) -> onnx.GraphProto:
        out = f"{name}_y"
        return helper.make_graph([helper.make_node("Conv", ["r1", weight], [out], name=f"{name}_conv")], name, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4, 8, 8])])

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("then", "wt"),
                              else_branch=branch("else", "we"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [_weight(rng, "w0", 8, 3, 3, 3), _weight(rng, "w1", 8, 8, 3, 3),
                               _weight(rng, "wt", 4, 8, 1, 1), _weight(rng, "we", 4, 8, 1, 1)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def branch_samples(count: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((3, 8, 8)).astype(np.float32), "cond": np.array(i % 2 == 0)}
            for i in range(count)]


def _both_branches(proto: onnx.ModelProto) -> list[np.ndarray]:
    x = np.random.default_rng(9).standard_normal((8, 3, 8, 8)).astype(np.float32)
    return [run_batches(proto, [{"x": x, "cond": np.array(flag)}]) for flag in (True, False)]


def test_a_model_with_an_if_calibrates_and_keeps_its_branches_float():
    result = optimize(branching_convs(), "quant", calibration_data=branch_samples(32))
    quantized = result.model.to_proto()
    assert {n.name for n in quantized.graph.node if n.op_type == "QuantizeLinear"}  # the outer convs
    branches = [a.g for n in quantized.graph.node if n.op_type == "If" for a in n.attribute]
    assert branches and all(n.op_type == "Conv" for g in branches for n in g.node)
    for ref, got in zip(_both_branches(branching_convs()), _both_branches(quantized), strict=True):
        assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 25


def _out_channels(proto: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.dims[0] for t in proto.graph.initializer}


def test_prune_keeps_the_channels_an_if_branch_reads():
    """conv1's output is read inside the branches, so its channels stay; conv0's feed conv1 alone and go."""
    result = optimize(branching_convs(), "prune{ratio=0.5}")
    pruned = result.model.to_proto()
    channels = _out_channels(pruned)
    assert channels["w0"] == 4 and channels["w1"] == 8
    assert [g.shape for g in _both_branches(pruned)] == [(8, 4, 8, 8)] * 2


def test_nodes_that_share_a_name_are_renamed_on_load(caplog):
    """ONNX Runtime refuses a model with two nodes of one name; irtool names them apart and says so."""
    proto = scaled_mlp()
    for node in proto.graph.node:
        node.name = "same"
    model = Model.from_proto(proto)
    assert [n.name for n in model.graph.nodes] == ["same", "same_1", "same_2", "same_3"]
    assert "3 node(s) named like an earlier node ('same' first) were renamed" in caplog.text
    batch = [{"x": np.ones((2, 8), np.float32), "s": np.array(2.0, np.float32)}]
    np.testing.assert_array_equal(run_batches(model.to_proto(), batch), run_batches(scaled_mlp(), batch))


def timestep_mlp() -> onnx.ModelProto:
    """y = MatMul(Relu(MatMul(x, w1) + MatMul(s * v, wt)), w2): the embedding MatMul reads s * v, which only the
    scalar input s feeds (a diffusion timestep's embedding), so a batch computes it once for all its samples."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["s", "v"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "wt"], ["te"], name="time_fc"),
             helper.make_node("Add", ["h", "te"], ["ht"], name="add"),
             helper.make_node("Relu", ["ht"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [_weight(rng, "w1", 8, 16), _weight(rng, "v", 1, 8), _weight(rng, "wt", 8, 16),
                               _weight(rng, "w2", 16, 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_bias_correct_weights_a_scalar_only_value_by_the_samples_that_share_it():
    """30 samples at s = 0.5 and 10 at s = 3: at batch size 16 the s = 0.5 samples make two batches and the
    s = 3 ones one, so time_fc's input mean counted per batch would be (2 e(0.5) + e(3)) / 3 instead of
    (30 e(0.5) + 10 e(3)) / 40; per sample, batch sizes 1 and 16 correct alike."""
    rng = np.random.default_rng(5)
    data = [{"x": rng.standard_normal(8).astype(np.float32), "s": np.array(s, np.float32)}
            for s in [0.5] * 30 + [3.0] * 10]

    def bias_of(batch_size: int) -> np.ndarray:
        model = optimize(timestep_mlp(), "bias-correct", calibration_data=data, calib_batch_size=batch_size).model
        add = next(n for n in model.graph.nodes if n.name == "time_fc_bias_add")
        return np.asarray(add.inputs[1].values)

    one, sixteen = bias_of(1), bias_of(16)
    np.testing.assert_allclose(sixteen, one, rtol=1e-5, atol=1e-9)
    assert np.abs(one).max() > 1e-6  # the embedding layer was corrected at all
