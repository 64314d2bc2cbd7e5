"""sparsify (unstructured, N:M) and drop-blocks (residual branch removal)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.analysis.cost import model_cost
from irtool.errors import InputError
from irtool.ir import Model
from irtool.passes.sparsify import n_m_mask
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline
from tests.prune.test_prune_masking import net_proto


def apply(proto_or_model, text: str, calib=None, seed: int = 0):
    model = proto_or_model if isinstance(proto_or_model, Model) else Model.from_proto(proto_or_model)
    records = PassManager(parse_pipeline(text).build(), verify_each=True).run(
        model, PassContext(seed=seed, calibration_data=calib))
    return model, records[0]


def weights(model: Model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.to_proto().graph.initializer if len(t.dims) >= 2}


def test_layer_magnitude_zeroes_exact_fraction_of_smallest():
    before = weights(Model.from_proto(net_proto()))
    model, record = apply(net_proto(), "sparsify{ratio=0.5}")
    after = weights(model)
    for name, w in after.items():
        if w.ndim >= 2 and name in before:
            zeros = np.count_nonzero(w == 0)
            assert zeros == int(np.floor(w.size * 0.5)), name
            kept = np.abs(before[name][w != 0])
            assert kept.min() >= np.abs(before[name][w == 0]).max()  # the smallest went
    assert record.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert model_cost(model).nonzero_params < model_cost(Model.from_proto(net_proto())).nonzero_params


def test_two_four_pattern_along_input_channels():
    model, _ = apply(net_proto(), "sparsify{pattern='2:4'}")
    for node in model.graph.nodes:
        if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
            w = np.asarray(node.inputs[1].values)
            if w.shape[1] % 4 == 0:
                blocks = np.moveaxis(w, 1, -1).reshape(*w.shape[:1], *w.shape[2:], -1, 4)
                assert (np.count_nonzero(blocks, axis=-1) <= 2).all()


def test_n_m_mask_keeps_the_largest():
    w = np.array([[1.0, -5.0, 3.0, 0.5, 2.0, -1.0, 0.1, 4.0]])
    assert n_m_mask(w, 1, 2, 4).tolist() == [[False, True, True, False, True, False, False, True]]


def test_global_scope_uses_one_threshold():
    model, record = apply(net_proto(), "sparsify{ratio=0.6,scope=global}")
    ws = weights(model)
    kept_min = min(np.abs(w[w != 0]).min() for w in ws.values())
    original = weights(Model.from_proto(net_proto()))
    zeroed_max = max(np.abs(original[n][ws[n] == 0]).max() for n in ws if np.any(ws[n] == 0))
    assert zeroed_max <= kept_min
    assert record.stats["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_random_is_seeded_and_exclude_works():
    a, _ = apply(net_proto(), "sparsify{method=random,ratio=0.3,exclude=['fc']}", seed=5)
    b, _ = apply(net_proto(), "sparsify{method=random,ratio=0.3,exclude=['fc']}", seed=5)
    assert a.to_proto().SerializeToString() == b.to_proto().SerializeToString()
    fc = [n for n in a.graph.nodes if "fc" in n.name and n.op == "Gemm"]
    assert fc and all(np.count_nonzero(np.asarray(n.inputs[1].values) == 0) == 0 for n in fc)


def test_bad_pattern_rejected():
    for text in ("sparsify{pattern='4:2'}", "sparsify{pattern=abc}", "sparsify{ratio=1}"):
        with pytest.raises(Exception, match="pattern|ratio"):
            parse_pipeline(text)


# ----------------------------------------------------------------------------------- drop-blocks
def residual_model(scales=(1.0, 0.01, 0.5)) -> onnx.ModelProto:
    """Three residual blocks x + W2·relu(W1·x); block 1's branch is nearly zero."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, scale in enumerate(scales):
        for j in (1, 2):
            inits.append(numpy_helper.from_array((rng.standard_normal((8, 8)) * scale).astype(np.float32), f"w{i}{j}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}1"], [f"h{i}"], name=f"mm{i}a"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}2"], [f"f{i}"], name=f"mm{i}b"),
                  helper.make_node("Add", [x, f"f{i}"], [f"x{i}"], name=f"add{i}")]
        x = f"x{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"], name="out"))
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calib():
    data = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
    return lambda: ({"x": d} for d in data)


def test_drops_the_least_harmful_branch():
    model, record = apply(residual_model(), "drop-blocks{count=1}", calib())
    names = [n.name for n in model.graph.nodes]
    assert "add1" not in names and "mm1a" not in names and "add0" in names and "add2" in names
    assert record.stats["blocks_dropped"] == 1 and record.stats["candidates"] == 3
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    err = np.abs(run_x(model.to_proto(), x) - run_x(residual_model(), x)).max()
    assert 0 < err < 0.2  # the nearly-zero branch mattered little


def run_x(proto, x):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_target_macs_drops_enough_blocks():
    model, record = apply(residual_model(), "drop-blocks{target-macs=0.5}", calib())
    before, after = model_cost(Model.from_proto(residual_model())).total_macs, model_cost(model).total_macs
    assert 1 - after / before >= 0.5
    assert record.stats["blocks_dropped"] == 2


def test_declines_without_residuals_and_needs_data():
    model, record = apply(net_proto(), "drop-blocks", calib=lambda: iter([{"x": np.zeros((2, 3, 8, 8), np.float32)}]))
    assert record.stats["candidates"] >= 1  # Net has one residual block
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, record = apply(plain, "drop-blocks", calib())
    assert record.modified is False and record.stats["candidates"] == 0
    with pytest.raises(InputError, match="calibration data"):
        apply(residual_model(), "drop-blocks")
