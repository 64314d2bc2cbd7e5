"""smooth (SmoothQuant): exact in float, outliers after LayerNorm moved into the weights, INT8 better where
there are outliers and unchanged where there are none; channel_abs_max against numpy at both ReduceMax forms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from golden.smooth.layernorm_qkv.model import build as ln_qkv
from irtool.api import optimize
from irtool.calibration.tap import channel_abs_max
from irtool.errors import InputError, PipelineError
from irtool.ir.model import Model
from tests.passes.helpers import feeds_for, run_ort
from tests.quant.torch_models import encoder_proto


def with_outliers(proto: onnx.ModelProto, factor: float = 30.0, channels=(3, 17, 40)) -> onnx.ModelProto:
    """The encoder with a few LayerNorm output channels `factor` times larger, as trained BERT-class models have."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    scales = {n.input[1] for n in out.graph.node if n.op_type == "LayerNormalization"}
    for tensor in out.graph.initializer:
        if tensor.name in scales:
            values = numpy_helper.to_array(tensor).copy()
            values[list(channels)] *= factor
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return out


def _sqnr(proto: onnx.ModelProto, pipeline: str) -> float:
    calib = [feeds_for(proto, i) for i in range(8)]
    test = [feeds_for(proto, 100 + i) for i in range(4)]
    model = optimize(proto, pipeline, calibration_data=calib).model
    ref = np.concatenate([run_ort(proto, f)["y"] for f in test]).astype(np.float64)
    got = np.concatenate([run_ort(model, f)["y"] for f in test]).astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def test_smoothing_is_exact_in_float_and_flattens_the_outlier_channels():
    proto = with_outliers(encoder_proto())
    calib = [feeds_for(proto, i) for i in range(4)]
    result = optimize(proto, "cleanup,smooth", calibration_data=calib)
    stats = next(r.stats for r in result.records if r.name == "smooth")
    assert stats["norms"] == 5 and stats["layers"] == 5
    feeds = feeds_for(proto, 50)
    ref, got = run_ort(proto, feeds)["y"], run_ort(result.model, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    before_model = optimize(proto, "cleanup").model
    norms = [n.outputs[0].name for n in before_model.graph.nodes if n.op == "LayerNormalization"]
    before = channel_abs_max(before_model, norms, calib)
    after = channel_abs_max(result.model, norms, calib)

    def spread(peaks):  # the largest channel against the typical one
        return max(float(p.max() / np.median(p)) for p in peaks.values())
    assert spread(before) > 15 and spread(after) < spread(before) / 3


def encoder_export(opset: int, outliers: bool) -> onnx.ModelProto:
    """The test encoder from torch at `opset` (below 17 its LayerNorms come out decomposed: ReduceMean, Sub,
    Pow, ..., Mul by the weight, Add of the bias), with 3 LayerNorm weight channels 30x when `outliers`."""
    import io

    import torch

    from tests.quant.torch_models import SEQ, _encoder_class

    torch.manual_seed(0)
    module = _encoder_class()().eval()
    if outliers:
        with torch.no_grad():
            for norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight[[3, 17, 40]] *= 30
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.randn(2, SEQ, 32),), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], opset_version=opset)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = 8
    return proto


def test_a_decomposed_layernorm_is_smoothed_through_its_weight_mul_and_bias_add():
    proto = encoder_export(14, outliers=True)
    assert "LayerNormalization" not in {n.op_type for n in proto.graph.node}
    calib = [feeds_for(proto, i) for i in range(8)]
    result = optimize(proto, "cleanup,smooth", calibration_data=calib)
    stats = next(r.stats for r in result.records if r.name == "smooth")
    assert stats["norms"] == 5 and stats["largest_spread"] > 15
    feeds = feeds_for(proto, 50)
    ref, got = run_ort(proto, feeds)["y"], run_ort(result.model, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    plain = "cleanup,calibrate{profile=ort-cpu},insert-qdq"
    assert _sqnr(proto, "cleanup,smooth,calibrate{profile=ort-cpu},insert-qdq") > _sqnr(proto, plain) + 2.0


def test_int8_gains_where_there_are_outliers_and_stays_where_there_are_none():
    outliers = with_outliers(encoder_proto())
    plain = "cleanup,calibrate{profile=ort-cpu},insert-qdq"
    smoothed = "cleanup,smooth,calibrate{profile=ort-cpu},insert-qdq"
    assert _sqnr(outliers, smoothed) > _sqnr(outliers, plain) + 2.0  # 9.0 -> 12.6 dB when measured
    assert abs(_sqnr(encoder_proto(), smoothed) - _sqnr(encoder_proto(), plain)) < 0.5  # 34.03 / 33.92


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax takes its axes as an input from opset 18
def test_channel_abs_max_matches_numpy(opset):
    proto = ln_qkv()
    proto.opset_import[0].version = opset
    model = Model.from_proto(proto)
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(3)]
    peaks = channel_abs_max(model, ["n", "q"], batches)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.extend([helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("n", "q")])
    import onnxruntime as ort

    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    values = [session.run(["n", "q"], b) for b in batches]
    for i, name in enumerate(("n", "q")):
        want = np.max([np.abs(v[i]).reshape(-1, 8).max(0) for v in values], axis=0)
        np.testing.assert_allclose(peaks[name], want, rtol=1e-6)


def test_quant_smooths_only_the_layernorms_with_outlier_channels():
    """quant runs smooth{min-spread=8}: the outlier encoder's five LayerNorms are smoothed (18.8 -> 21.9 dB when
    measured), the plain encoder's are measured and left as they are."""
    calib = [feeds_for(encoder_proto(), i) for i in range(8)]
    for proto, smoothed in ((with_outliers(encoder_proto()), 5), (encoder_proto(), 0)):
        result = optimize(proto, "quant", calibration_data=calib)
        stats = next(r.stats for r in result.records if r.name == "smooth")
        assert stats["norms"] == smoothed and stats["norms_without_outliers"] == 5 - smoothed
        assert (stats["largest_spread"] >= 8) == bool(smoothed)
    assert _sqnr(with_outliers(encoder_proto()), "quant") > 20.0


def test_no_layernorm_no_data_pass():
    from tests.quant.torch_models import cnn_proto

    result = optimize(cnn_proto(), "smooth")  # no calibration data, and none needed
    assert result.records[0].stats == {"norms": 0, "layers": 0} and not result.records[0].modified


def test_smooth_needs_data_and_a_valid_alpha():
    with pytest.raises(InputError, match="smooth needs calibration data"):
        optimize(ln_qkv(), "smooth")
    with pytest.raises(PipelineError, match="alpha must be in"):
        optimize(ln_qkv(), "smooth{alpha=1.5}")
    with pytest.raises(PipelineError, match="min-spread must be >= 0"):
        optimize(ln_qkv(), "smooth{min-spread=-1}")
