"""einsum-to-matmul: two-operand Einsum equations against numpy's einsum (activations, constant weights, merged
and missing groups, ellipses, implicit outputs, dynamic batch dims, opsets 13 and 17), the equations it
declines, and the quant pipeline giving an einsum attention integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.ir.einsum import parse
from irtool.passes.pipelines import QUANT
from tests.passes.helpers import model_of, ops, run
from tests.quant.ort_run import optimized_ops

# equation, shape of A, shape of B, B a constant (weight)
SUPPORTED = [
    ("bhqd,bhkd->bhqk", [2, 3, 5, 4], [2, 3, 6, 4], False),  # attention scores
    ("bhqk,bhkd->bhqd", [2, 3, 5, 6], [2, 3, 6, 4], False),  # attention-weighted values
    ("bid,bjd->bij", [2, 5, 4], [2, 6, 4], False),
    ("abc,cd->abd", [2, 5, 8], [8, 6], True),  # Keras EinsumDense
    ("abc,cde->abde", [2, 5, 8], [8, 3, 4], True),  # Keras MultiHeadAttention's projection into heads
    ("abcd,cde->abe", [2, 5, 3, 4], [3, 4, 6], True),  # ... and out of them (two contracted letters)
    ("abcd,cde->abe", [2, 5, 3, 4], [3, 4, 6], False),
    ("bd,bjd->bj", [2, 4], [2, 5, 4], False),  # no free letter in A
    ("...ij,...jk->...ik", [2, 3, 4, 5], [2, 3, 5, 6], False),  # ellipsis
    ("...ij,...jk->...ik", [2, 1, 4, 5], [2, 3, 5, 6], False),  # ... broadcast
    ("ij,jk", [4, 5], [5, 6], False),  # implicit output
    ("ik,kj->ji", [4, 5], [5, 6], False),  # transposed output
    ("ab,b->a", [4, 5], [5], True),  # matrix-vector
    ("b,ab->a", [5], [4, 5], False),
    ("ij,ij->i", [4, 5], [4, 5], False),  # row-wise dot products
    ("ij,ij->", [4, 5], [4, 5], False),
    ("bkc,bkcn->bn", [2, 3, 4], [2, 3, 4, 5], False),  # two contracted letters in an activation B
    ("nchw,oc->nohw", [2, 3, 4, 5], [6, 3], True),  # a 1x1 conv written as einsum
]

DECLINED = [
    ("ii,ij->j", [4, 4], [4, 5]),  # a diagonal
    ("ij,jk->ijk", [4, 5], [5, 6]),  # no contraction: an outer product
    ("ij,kl->il", [4, 5], [6, 7]),  # j and k summed out of one operand alone
]


def einsum_model(equation: str, shape_a: list, shape_b: list, constant_b: bool, opset: int = 17,
                 dynamic: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(len(equation))
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", *shape_a[1:]] if dynamic else shape_a)]
    initializers = []
    if constant_b:
        initializers.append(numpy_helper.from_array(rng.standard_normal(shape_b).astype(np.float32), "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT,
                                                    ["n", *shape_b[1:]] if dynamic else shape_b))
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="ein", equation=equation)
    out_shape = list(np.einsum(equation, np.zeros(shape_a), np.zeros(shape_b)).shape)
    out_dims = [f"y{i}" for i in range(len(out_shape))] if dynamic else out_shape
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def feeds_for(proto: onnx.ModelProto, shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(shapes[i.name]).astype(np.float32) for i in proto.graph.input}


def run_ort(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def constant(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("equation, shape_a, shape_b, constant_b", SUPPORTED)
def test_equation_becomes_matmul_and_matches_numpy(equation, shape_a, shape_b, constant_b, opset):
    proto = einsum_model(equation, shape_a, shape_b, constant_b, opset)
    model = model_of(proto)
    records = run(model, "einsum-to-matmul")
    assert records[0].stats["rewritten"] == 1 and "Einsum" not in ops(model) and ops(model).count("MatMul") == 1
    out = model.to_proto()
    feeds = feeds_for(proto, {"a": shape_a, "b": shape_b}, seed=1)
    operand_b = constant(proto, "b") if constant_b else feeds["b"]
    want = np.einsum(equation, feeds["a"].astype(np.float64), operand_b.astype(np.float64))
    got = run_ort(out, feeds)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, run_ort(proto, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, shape_a, shape_b, constant_b", [
    ("bhqd,bhkd->bhqk", [2, 3, 5, 4], [2, 3, 6, 4], False), ("abcd,cde->abe", [2, 5, 3, 4], [3, 4, 6], True),
    ("abc,cde->abde", [2, 5, 8], [8, 3, 4], True), ("bkc,bkcn->bn", [2, 3, 4], [2, 3, 4, 5], False)])
def test_dynamic_batch_runs_at_any_size(equation, shape_a, shape_b, constant_b):
    """Reshapes copy the leading dims (0) or infer one (-1), so the rewritten model runs at another batch size."""
    proto = einsum_model(equation, shape_a, shape_b, constant_b, dynamic=True)
    model = model_of(proto)
    run(model, "einsum-to-matmul")
    assert "Einsum" not in ops(model)
    for batch in (1, 7):
        shapes = {"a": [batch, *shape_a[1:]], "b": [batch, *shape_b[1:]]}
        feeds = feeds_for(proto, shapes, seed=batch)
        np.testing.assert_allclose(run_ort(model.to_proto(), feeds), run_ort(proto, feeds), rtol=1e-5, atol=1e-5)


def test_several_contracted_letters_of_an_activation_b_need_their_sizes():
    """B' [.., K1, K2, N] merges K only when K's sizes are known: with them symbolic the Einsum stays."""
    proto = einsum_model("bkc,bkcn->bn", [2, 3, 4], [2, 3, 4, 5], False)
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim[1:3]:
            dim.dim_param = "k"
    model = model_of(proto)
    assert run(model, "einsum-to-matmul")[0].stats["rewritten"] == 0 and ops(model) == ["Einsum"]


@pytest.mark.parametrize("equation, shape_a, shape_b", DECLINED)
def test_declined_equations_stay_einsum(equation, shape_a, shape_b):
    model = model_of(einsum_model(equation, shape_a, shape_b, False))
    records = run(model, "einsum-to-matmul")
    assert records[0].stats["rewritten"] == 0 and not records[0].modified and ops(model) == ["Einsum"]


def test_parse_spells_out_ellipses_and_implicit_outputs():
    eq = parse("...ij,...jk->...ik", 4, 3)  # numpy's right-aligned ellipses (ONNX asks for equal ranks)
    assert (eq.a[2:], eq.b[1:], eq.out[2:]) == ("ij", "jk", "ik") and eq.a[1] == eq.b[0] == eq.out[1]
    assert eq.out[:2] == eq.a[:2]
    implicit = parse("ij,jk", 2, 2)
    assert (implicit.a, implicit.b, implicit.out) == ("ij", "jk", "ik")
    assert parse("ij,jk,kl->il", 2, 2) is None and parse("ij,jk->ik", 3, 2) is None  # three operands; bad rank


def einsum_attention(seed: int = 0) -> onnx.ModelProto:
    """x [n, 6, 16] -> q, k, v projections (EinsumDense) -> einsum scores -> Softmax -> einsum values -> out."""
    rng = np.random.default_rng(seed)
    weights = {name: (rng.standard_normal((16, 16)) / 4).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("Einsum", ["x", f"w{p}"], [p], equation="bid,de->bie") for p in "qkv"]
    nodes += [helper.make_node("Einsum", ["q", "k"], ["s"], equation="bid,bjd->bij"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("Einsum", ["p", "v"], ["o"], equation="bij,bjd->bid"),
              helper.make_node("Einsum", ["o", "wo"], ["y"], equation="bid,de->bie")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 16])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_quant_gives_an_einsum_attention_integer_kernels(tmp_path):
    """Without the rewrite every Einsum runs in float between DQ and Q; `quant` rewrites them first, and ONNX
    Runtime runs all six products in integer kernels (the four projections as QGemm, since bias-correct gives
    them a bias Add), within an SQNR budget of the float model."""
    proto = einsum_attention()
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((4, 6, 16)).astype(np.float32)} for _ in range(8)]
    evaluation = [{"x": rng.standard_normal((4, 6, 16)).astype(np.float32)} for _ in range(4)]
    quantized = optimize(proto, "quant", calibration_data=calib).model.to_proto()
    kernels = optimized_ops(quantized, str(tmp_path / "opt.onnx"), evaluation)
    without = optimize(proto, QUANT.replace("einsum-to-matmul,", ""), calibration_data=calib).model.to_proto()
    assert optimized_ops(without, str(tmp_path / "without.onnx"), evaluation)["Einsum"] == 6
    assert kernels["Einsum"] == 0 and kernels["QGemm"] == 4, kernels
    assert kernels["QLinearMatMul"] + kernels["MatMulIntegerToFloat"] == 2, kernels
    ref = np.concatenate([run_ort(proto, f) for f in evaluation]).astype(np.float64)
    got = np.concatenate([run_ort(quantized, f) for f in evaluation]).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert sqnr > 20.0, sqnr  # quant's own min-sqnr target


def test_quant_trt_puts_qdq_on_the_rewritten_products():
    """quant-trt runs the rewrite too: no Einsum left, and both inputs of every MatMul come from a
    DequantizeLinear (TensorRT's explicit-quantization pattern for an INT8 GEMM)."""
    proto = einsum_attention()
    rng = np.random.default_rng(4)
    calib = [{"x": rng.standard_normal((4, 6, 16)).astype(np.float32)} for _ in range(8)]
    model = optimize(proto, "quant-trt", calibration_data=calib).model
    producers = {out.name: node.op for node in model.nodes() for out in node.outputs}
    matmuls = [node for node in model.nodes() if node.op == "MatMul"]
    assert "Einsum" not in ops(model) and len(matmuls) == 6
    for node in matmuls:
        assert [producers.get(t.name) for t in node.inputs] == ["DequantizeLinear"] * 2, node.name
