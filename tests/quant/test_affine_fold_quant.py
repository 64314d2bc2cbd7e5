"""A batch norm decomposed into Mul + Add by its exporter, after Convs without bias: `quant` folds both
(fold-bn), so ONNX Runtime runs one QLinearConv per layer and no QLinearMul/QLinearAdd between them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from tests.quant.ort_run import optimized_ops, run_batches


def decomposed_bn_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, (c_in, c_out) in enumerate(((3, 8), (8, 16))):
        inits += [numpy_helper.from_array(rng.normal(0, 0.4, (c_out, c_in, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.uniform(0.2, 3.0, (c_out, 1, 1)).astype(np.float32), f"scale{i}"),
                  numpy_helper.from_array(rng.normal(0, 1.0, (1, c_out, 1, 1)).astype(np.float32), f"shift{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Mul", [f"c{i}", f"scale{i}"], [f"m{i}"], name=f"bn{i}_mul"),
                  helper.make_node("Add", [f"m{i}", f"shift{i}"], [f"a{i}"], name=f"bn{i}_add"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (10, 16)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "decomposed", [value("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [value("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


def test_quant_folds_a_decomposed_batch_norm_into_one_integer_conv(tmp_path):
    proto = decomposed_bn_cnn()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    test = [{"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)} for _ in range(4)]
    ref = run_batches(proto, test)
    folded = optimize(proto, "quant", calibration_data=calib)
    assert next(r for r in folded.records if r.name == "fold-bn").stats["affine_folded"] == 4
    ops = optimized_ops(folded.model.to_proto(), str(tmp_path / "folded.onnx"), test)
    assert ops["QLinearConv"] == 2 and ops["QLinearMul"] == ops["QLinearAdd"] == ops["Mul"] == ops["Add"] == 0
    # the same recipe with the Mul and Add left apart: each one an integer op of its own, and more error
    apart = optimize(proto, "calibrate{profile=ort-cpu},insert-qdq", calibration_data=calib)
    apart_ops = optimized_ops(apart.model.to_proto(), str(tmp_path / "apart.onnx"), test)
    assert apart_ops["QLinearMul"] + apart_ops["QLinearAdd"] + apart_ops["Mul"] + apart_ops["Add"] >= 2
    folded_sqnr = _sqnr(ref, run_batches(folded.model.to_proto(), test))
    apart_sqnr = _sqnr(ref, run_batches(apart.model.to_proto(), test))
    assert folded_sqnr > 30 and folded_sqnr > apart_sqnr + 1.0, (folded_sqnr, apart_sqnr)


def test_convnext_layer_scales_fold_into_their_linear_layers(tmp_path):
    """gamma · Linear(x) in each ConvNeXt block: fold-scale puts gamma into the Linear's columns, so no
    QLinearMul is left between the block's QGemm and its residual Add (there were 7)."""
    from tests.prune.archs import ARCHS, export_arch

    proto = export_arch("convnext_tiny", False)
    shape = ARCHS["convnext_tiny"][1]
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    test = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    result = optimize(proto, "quant", calibration_data=calib)
    assert next(r for r in result.records if r.name == "fold-scale").stats["folded"] == 7
    ops = optimized_ops(result.model.to_proto(), str(tmp_path / "convnext.onnx"), test)
    assert ops["QLinearMul"] == 0 and ops["QGemm"] >= 14
    assert _sqnr(run_batches(proto, test), run_batches(result.model.to_proto(), test)) > 24
