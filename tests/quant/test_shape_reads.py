"""ort-cpu: a Shape (or Size) that reads a quantized activation reads its QuantizeLinear output, not the
DequantizeLinear's. torch's legacy exporter with dynamic axes reads the dims of activations to reshape them
(nn.MultiheadAttention reads two per block, the bench's ViT 14 in all); read from a DQ, each kept that DQ in ONNX
Runtime's graph: a float copy of the tensor made only for its dims."""

from __future__ import annotations

import numpy as np
import onnx

from irtool.api import optimize
from tests.quant.ort_run import optimized_ops, run_batches
from tests.quant.torch_models import attention_proto


def _multihead_attention() -> onnx.ModelProto:
    return attention_proto("multihead", dynamic_batch=True)


def _batches(seed: int, count: int, batch: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 6, 48)).astype(np.float32)} for _ in range(count)]


def _shape_sources(proto: onnx.ModelProto) -> list[str]:
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    return [producers.get(n.input[0], "input") for n in proto.graph.node if n.op_type in ("Shape", "Size")]


def test_shapes_read_the_integers_and_onnx_runtime_keeps_no_dequantize_for_them(tmp_path):
    proto = _multihead_attention()
    quantized = optimize(proto, "quant", calibration_data=_batches(0, 8)).model.to_proto()
    sources = _shape_sources(quantized)
    assert "DequantizeLinear" not in sources and sources.count("QuantizeLinear") >= 2
    ops = optimized_ops(quantized, str(tmp_path / "optimized.onnx"), _batches(1, 1))
    # No DQ left: two (one per Shape read) before this rule, and the output's until the output projection's QGemm
    # returned float itself (placement rule 9: nothing integer reads the output).
    assert ops["DequantizeLinear"] == 0
    assert ops["QGemm"] == 2 and ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1  # scores float
    test = _batches(2, 4, batch=3)  # another batch size: the dims read from the integers are right
    reference, out = run_batches(proto, test), run_batches(quantized, test)
    assert 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - out) ** 2)) > 25.0


def test_the_trt_profile_keeps_shapes_on_the_dequantized_tensor():
    """TensorRT takes Q/DQ as pairs: a QuantizeLinear output read by anything but its DequantizeLinear is not a
    pattern its explicit-quantization parser documents, so quant-trt leaves the Shape where it was."""
    proto = _multihead_attention()
    quantized = optimize(proto, "quant-trt", calibration_data=_batches(0, 8)).model.to_proto()
    assert "QuantizeLinear" not in _shape_sources(quantized)
