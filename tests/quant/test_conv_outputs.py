"""ort-cpu placement rule 10: a quantized Conv whose output leaves the model (a segmentation head, an auxiliary
output) gets a Q/DQ on that output, the DQ writing the graph output. ONNX Runtime has no integer Conv with a float
output: left float, the head ran as a float Conv behind a Q/DQ of its input and a DequantizeLinear of its weights
on every run (a small U-Net: 1.14x quantize_static's latency, whose model quantizes that output)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from tests.quant.digits_models import sqnr_db
from tests.quant.ort_run import optimized_ops

SHAPE = (1, 3, 16, 16)


def _conv(name: str, x: str, c_in: int, c_out: int, k: int, rng) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    w = numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32),
                                f"{name}.w")
    b = numpy_helper.from_array((0.1 * rng.standard_normal(c_out)).astype(np.float32), f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [name], name=name, pads=[k // 2] * 4)
    return node, [w, b]


def _segmenter() -> onnx.ModelProto:
    """conv -> relu -> conv `aux` (a graph output that the next conv also reads) -> relu -> conv `seg` (the head),
    and a second head `edge` = Relu(conv), a graph output behind a fused activation."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for node, weights in (_conv("c1", "x", 3, 16, 3, rng), _conv("aux", "r1", 16, 16, 3, rng),
                          _conv("seg", "r2", 16, 5, 1, rng), _conv("e", "r2", 16, 2, 1, rng)):
        nodes.append(node)
        inits += weights
    nodes[1:1] = [helper.make_node("Relu", ["c1"], ["r1"])]
    nodes[3:3] = [helper.make_node("Relu", ["aux"], ["r2"])]
    nodes.append(helper.make_node("Relu", ["e"], ["edge"]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("seg", "aux", "edge")]
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(count)]


def _outputs(proto: onnx.ModelProto, batches) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(None, b) for b in batches]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]



def test_a_conv_writing_a_graph_output_runs_as_an_integer_conv(tmp_path):
    proto = _segmenter()
    quantized = optimize(proto, "quant", calibration_data=_batches(0, 8)).model.to_proto()
    assert [o.name for o in quantized.graph.output] == ["seg", "aux", "edge"]
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert all(producers[name] == "DequantizeLinear" for name in ("seg", "aux", "edge"))
    path = tmp_path / "optimized.onnx"
    ops = optimized_ops(quantized, str(path), _batches(1, 1))
    # Every Conv on integers, and no weight dequantized at run time (before: none of the three Convs that write an
    # output fused, and each kept a DQ of its weights and bias). The DQs: the three outputs', and `aux` requantized
    # for its Relu's readers (ONNX Runtime drops the Relu between that DQ and Q).
    assert ops["QLinearConv"] == 4 and not ops["Conv"] and not ops["FusedConv"]
    optimized = onnx.load(path).graph
    initializers = {t.name for t in optimized.initializer}
    dequantized = [n for n in optimized.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 4 and not any(n.input[0] in initializers for n in dequantized)
    test = _batches(2, 4)
    for name, reference, out in zip(("seg", "aux", "edge"), _outputs(proto, test), _outputs(quantized, test),
                                    strict=True):
        assert sqnr_db(reference, out) > 25.0, name


def test_the_aux_output_and_its_reader_see_the_same_dequantized_values():
    """`aux` is a graph output and the next conv's input: both read the one DQ (no float copy stays beside it)."""
    quantized = optimize(_segmenter(), "quant", calibration_data=_batches(0, 8)).model.to_proto()
    readers = [n for n in quantized.graph.node if "aux" in n.input]
    assert [n.op_type for n in readers] == ["Relu"]  # the fused activation, then its own Q/DQ
    float_aux = next(n.output[0] for n in quantized.graph.node if n.name == "aux")
    assert [n.op_type for n in quantized.graph.node if float_aux in n.input] == ["QuantizeLinear"]


@pytest.mark.parametrize("pipeline", ["quant-trt", "cleanup,calibrate,insert-qdq{keep-last=true}"])
def test_outputs_stay_float_where_the_profile_or_the_user_says(pipeline):
    """TensorRT picks a layer's output precision itself (trt rule 2); keep-last leaves the last Conv float."""
    quantized = optimize(_segmenter(), pipeline, calibration_data=_batches(0, 8)).model.to_proto()
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    if pipeline == "quant-trt":
        assert producers["seg"] == "Conv" and producers["aux"] == "Conv"
    else:
        assert producers["edge"] == "Relu" and producers["seg"] == "DequantizeLinear"
        last = next(n for n in quantized.graph.node if n.name == "e")
        assert all(i in {t.name for t in quantized.graph.initializer} for i in last.input[1:])  # float weights
