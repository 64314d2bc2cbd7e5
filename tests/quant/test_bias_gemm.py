"""ort-cpu: MatMul + constant bias Add is quantized as one Gemm (passes/quant/bias_gemm.py), which ONNX Runtime runs
as a QGemm with the bias in its accumulator, at every input rank and with dynamic dims."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.passes.quant.calibrate import METADATA_KEY
from tests.quant.ort_run import optimized_ops

K, N = 8, 16


def linear_block(dims: list, opset: int = 17, bias_shape: tuple = (N,), bias_first: bool = False,
                 after: str | None = None, reread: bool = False, bias: str = "constant",
                 sum_out: bool = False) -> onnx.ModelProto:
    """x @ W + b (`after`: an op on the sum; Clip with bounds 0 and 6), then a second MatMul reads it (so its
    output is quantized); `reread`, `sum_out`: the MatMul's output or the sum is also a graph output."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((K, N)) * 0.4).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((N, 4)) * 0.4).astype(np.float32), "w2")]
    if bias == "constant":
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b"))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc")]
    nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["h"], name="bias"))
    if after:
        bounds = ["lo", "hi"] if after == "Clip" else []
        inits += [numpy_helper.from_array(np.float32(v), n) for n, v in zip(bounds, (0.0, 6.0), strict=False)]
        nodes.append(helper.make_node(after, ["h", *bounds], ["act"], name="act"))
    nodes.append(helper.make_node("MatMul", ["act" if after else "h", "w2"], ["y"], name="fc2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if reread:
        outputs.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    if sum_out:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    if bias == "input":
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [*dims[:-1], N]))
    graph = helper.make_graph(nodes, "linear", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _feeds(proto: onnx.ModelProto, dims: list, seed: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    """Batches for the declared dims, symbolic ones sized 3 (and 2 for a second symbol)."""
    sizes = iter([3, 2, 5])
    named: dict[str, int] = {}
    shape = [d if isinstance(d, int) else named.setdefault(d, next(sizes)) for d in dims]
    rng = np.random.default_rng(seed)
    names = [i.name for i in proto.graph.input]
    return [{name: rng.standard_normal(shape if name == "x" else [*shape[:-1], N]).astype(np.float32)
             for name in names} for _ in range(count)]


def _quantized(proto: onnx.ModelProto, dims: list) -> onnx.ModelProto:
    return optimize(proto, "calibrate,insert-qdq", calibration_data=_feeds(proto, dims, 0, 8)).model.to_proto()


def _run(proto: onnx.ModelProto, feeds: list[dict], optimized: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _sqnr(reference: list[np.ndarray], out: list[np.ndarray]) -> float:
    ref, got = np.concatenate([r.ravel() for r in reference]), np.concatenate([o.ravel() for o in out])
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


@pytest.mark.parametrize("dims, opset, bias_shape, bias_first", [
    ([2, 5, K], 17, (N,), False),             # static: the output shape is a constant
    (["N", 5, K], 17, (N,), True),            # dynamic batch; bias as the Add's first input
    (["N", "T", K], 17, (1, 1, N), False),    # dynamic tokens: Shape(end=-1) + Concat; a [1, 1, N] bias
    (["N", "T", K], 13, (N,), False),         # the same below opset 15: Shape + Slice
    (["N", 2, 3, K], 17, (N,), False),        # rank 4
    ([6, K], 17, (N,), False),                # rank 2: a plain Gemm, no Reshape
], ids=["static", "dynamic-batch", "dynamic-tokens", "opset13", "rank4", "rank2"])
def test_matmul_and_bias_add_run_as_one_integer_gemm(tmp_path, dims, opset, bias_shape, bias_first):
    proto = linear_block(dims, opset, bias_shape, bias_first)
    quantized = _quantized(proto, dims)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Add" not in ops and ops.count("Gemm") == 1 and ops.count("MatMul") == 1
    assert ops.count("Reshape") == (0 if len(dims) == 2 else 2)
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    assert gemm.name == "fc"  # the MatMul's name: exclusions and sensitivity tables keep meaning it
    q_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert "mm" not in q_inputs and "h" in q_inputs  # one rounding, after the bias
    test = _feeds(proto, dims, 1)
    fused = optimized_ops(quantized, str(tmp_path / "optimized.onnx"), test[:1])
    assert fused["QGemm"] == 1 and not {"QLinearAdd", "QLinearMatMul", "Add"} & set(fused)
    reference, out = _run(proto, test), _run(quantized, test)
    assert [o.shape for o in out] == [r.shape for r in reference]
    assert _sqnr(reference, out) > 25.0
    # ONNX Runtime's integer kernel computes what the Q/DQ graph defines (run unfused).
    assert _sqnr(_run(quantized, test, optimized=False), out) > 40.0


@pytest.mark.parametrize("dims, after", [
    ([2, 5, K], "Relu"), (["N", "T", K], "Relu"), (["N", 5, K], "Clip"), ([6, K], "Relu"),
], ids=["static-relu", "dynamic-tokens-relu", "relu6", "rank2-relu"])
def test_a_relu_after_the_bias_runs_inside_the_integer_gemm(tmp_path, dims, after):
    """nn.Linear then ReLU (a ReLU MLP on tokens): the activation moves between the Gemm and its Q, inside the
    Reshapes, where ONNX Runtime folds it into the QGemm's output range; before, the pair stayed a QLinearMatMul
    and a QLinearAdd of a u8 bias."""
    proto = linear_block(dims, after=after)
    quantized = _quantized(proto, dims)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Add" not in ops and ops.count("Gemm") == 1 and ops.count(after) == 1
    activation = next(n for n in quantized.graph.node if n.op_type == after)
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert producers[activation.input[0]] == "Gemm"  # the 2-D product, not the Reshape back
    test = _feeds(proto, dims, 1)
    fused = optimized_ops(quantized, str(tmp_path / "optimized.onnx"), test[:1])
    assert fused["QGemm"] == 1 and not {"QLinearAdd", "QLinearMatMul", "Add", after} & set(fused)
    reference, out = _run(proto, test), _run(quantized, test)
    assert [o.shape for o in out] == [r.shape for r in reference]
    assert _sqnr(reference, out) > 25.0
    assert _sqnr(_run(quantized, test, optimized=False), out) > 40.0


def test_the_fused_gemm_rounds_once_and_is_at_least_as_accurate_as_matmul_then_add():
    """The same block with a second reader of the MatMul's output keeps MatMul + Add (QLinearMatMul, then the
    bias added to its rounded output): the fused form's error is lower on the same data and ranges."""
    dims = ["N", 5, K]
    test = _feeds(linear_block(dims), dims, 1)
    fused, apart = linear_block(dims), linear_block(dims, reread=True)
    fused_sqnr = _sqnr(_run(fused, test), _run(_quantized(fused, dims), test))
    apart_sqnr = _sqnr(_run(apart, test), _run(_quantized(apart, dims), test))
    assert fused_sqnr >= apart_sqnr


@pytest.mark.parametrize(("kwargs", "integer_out"), [
    ({"reread": True}, True),                     # the MatMul's output has another reader (here: a graph output)
    ({"bias": "input"}, False),                   # the addend is an activation (a residual), not a constant
    ({"bias_shape": (5, N)}, True),               # a bias that varies along the tokens is not a Gemm's C
    ({"after": "Relu", "sum_out": True}, True),   # the sum is a graph output: it must stay, before the Relu
], ids=["reread", "activation", "per-token", "relu-after-an-output"])
def test_what_is_not_a_linear_layer_stays_matmul_then_add(kwargs, integer_out):
    """integer_out: the MatMul's output is quantized (QLinearMatMul). Not where the Add's other input is a float
    activation: that Add runs in float, so the MatMul returns float (MatMulIntegerToFloat), one rounding less."""
    dims = ["N", 5, K]
    proto = linear_block(dims, **kwargs)
    quantized = _quantized(proto, dims)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Gemm" not in ops and ops.count("MatMul") == 2 and "Add" in ops
    assert ("mm" in {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}) == integer_out


def test_calibrate_observes_the_sum_not_the_matmul_output():
    dims = ["N", 5, K]
    proto = linear_block(dims)
    result = optimize(proto, "calibrate", calibration_data=_feeds(proto, dims, 0))
    ranges = json.loads(result.model.metadata[METADATA_KEY])["ranges"]
    assert "h" in ranges and "mm" not in ranges
