"""bias-correct{mode=empirical}: every layer's output mean in the quantized model equals the float model's, which
recovers more of the INT8 loss than the analytic correction on trained nets; errors and determinism."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from golden._quant_blocks import depthwise_chain, gelu_mlp, wide_chain
from irtool.api import optimize
from irtool.errors import InputError, PipelineError
from tests.passes.helpers import serialized
from tests.prune.digits import calibration
from tests.quant.digits_models import logits, sqnr_db
from tests.quant.test_quant_accuracy import trained

EMPIRICAL = "cleanup,fold-bn,calibrate{method=minmax},bias-correct{mode=empirical,samples=%d},insert-qdq%s"


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A session fetching `names` too (as graph outputs ONNX Runtime runs those layers unfused, in float)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(proto)
    tapped.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])


def _layer_outputs(proto: onnx.ModelProto) -> dict[str, int]:
    """Each Conv's and Gemm's output, with its channel axis."""
    return {n.output[0]: 1 if n.op_type == "Conv" else -1 for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}


def _means(proto: onnx.ModelProto, names: dict[str, int], x: np.ndarray) -> dict[str, np.ndarray]:
    values = _with_outputs(proto, list(names)).run(list(names), {"x": x})
    return {name: v.astype(np.float64).mean(axis=tuple(i for i in range(v.ndim) if i != names[name] % v.ndim))
            for name, v in zip(names, values, strict=True)}


@pytest.mark.parametrize("profile", ["", "trt"])
def test_every_layer_mean_matches_the_float_model_on_the_samples_it_measured(profile):
    """The oracle of the mode: with the corrected biases in the INT8 model, each layer's per-channel output mean on
    the samples bias-correct ran equals the float model's, to a small fraction of the layer's output spread (the
    int32 bias moves in steps of s_x * s_w). The analytic correction leaves shifts larger by orders of magnitude."""
    proto, data = trained("mobilenet")
    x_calib = data["calib"][0]
    folded = optimize(proto, "cleanup,fold-bn").model.to_proto()
    names = _layer_outputs(folded)
    reference = _means(folded, names, x_calib[:64])
    values = _with_outputs(folded, list(names)).run(list(names), {"x": x_calib[:64]})
    spread = {n: v.std() for n, v in zip(names, values, strict=True)}
    worst = {}
    for mode in ("analytic", "empirical"):
        text = EMPIRICAL.replace("mode=empirical", f"mode={mode}") % (64, f"{{profile={profile}}}" if profile else "")
        if profile:  # bias-correct takes the profile calibrate measured for
            text = text.replace("method=minmax", f"method=minmax,profile={profile}").replace(
                "bias-correct{", "bias-correct{reduce-range=false,")
        result = optimize(proto, text, calibration_data=calibration(x_calib))
        assert mode == "analytic" or result.stats("bias-correct")["samples"] == 64
        measured = _means(result.model.to_proto(), names, x_calib[:64])
        worst[mode] = max(np.abs(measured[n] - reference[n]).max() / spread[n] for n in names)
    assert worst["empirical"] < 1e-3, worst  # 2.7e-4 (ort-cpu) and 3.4e-4 (trt) when this was written
    assert worst["analytic"] > 10 * worst["empirical"], worst


def test_empirical_recovers_more_than_analytic_on_the_mobilenet_like_digits_net():
    """Trained MobileNet-like digits net (seed 0), per-channel u8 x s8 INT8, logits on the 497 held-out images:
    plain 30.21 dB, analytic bias correction 30.93, empirical 34.96 when this was written (mean of seeds 0-2:
    28.79, 31.46, 34.91)."""
    proto, data = trained("mobilenet")
    (x, y), x_calib = data["test"], data["calib"][0]
    ref = logits(proto, x)
    sqnr, accuracy = {}, {}
    for label, text in (("plain", "cleanup,fold-bn,calibrate{method=minmax},insert-qdq"),
                        ("analytic", "cleanup,fold-bn,calibrate{method=minmax},bias-correct,insert-qdq"),
                        ("empirical", EMPIRICAL % (64, ""))):
        out = logits(optimize(proto, text, calibration_data=calibration(x_calib)).model.to_proto(), x)
        sqnr[label], accuracy[label] = sqnr_db(ref, out), float(np.mean(out.argmax(1) == y))
    assert sqnr["empirical"] > sqnr["analytic"] + 2.0, sqnr
    assert sqnr["empirical"] > sqnr["plain"] + 3.01, sqnr  # under half of plain INT8's noise power
    assert accuracy["empirical"] >= accuracy["plain"] - 0.004, accuracy


def test_token_layers_are_measured_over_batch_and_tokens():
    """A transformer MLP on [batch, tokens, features]: fc1 (MatMul + bias Add) runs as one Gemm over the rows in
    the ort-cpu model, fc2 gets a bias Add; both get the float model's mean per feature."""
    proto = gelu_mlp("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 1, 4, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    quantized = optimize(proto, "calibrate,bias-correct{mode=empirical},insert-qdq", calibration_data=data)
    out = quantized.model.to_proto()
    names = {"fc1_bias": -1, "fc2": -1}
    float_means = _means_over(proto, names, x)
    int8_means = _means_over(out, names, x)
    for name in names:
        np.testing.assert_allclose(int8_means[name], float_means[name], atol=2e-4)
    assert quantized.stats("bias-correct")["bias_adds_inserted"] == 1


def _means_over(proto: onnx.ModelProto, names: dict[str, int], samples: np.ndarray) -> dict[str, np.ndarray]:
    session = _with_outputs(proto, list(names))
    values = [session.run(list(names), {"x": s}) for s in samples]
    return {name: np.concatenate([v[i].reshape(-1, v[i].shape[-1]) for v in values]).astype(np.float64).mean(0)
            for i, name in enumerate(names)}


def test_empirical_needs_calibrated_ranges_and_data():
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match="run `calibrate` before it"):
        optimize(depthwise_chain(), "bias-correct{mode=empirical}", calibration_data=lambda: iter({"x": s} for s in x))
    with pytest.raises(InputError, match="calibration data"):
        optimize(depthwise_chain(), "bias-correct{mode=empirical}")
    with pytest.raises(PipelineError, match="samples must be >= 1"):
        optimize(depthwise_chain(), "calibrate,bias-correct{mode=empirical,samples=0}",
                 calibration_data=lambda: iter({"x": s} for s in x))


def test_same_input_same_bytes_and_the_first_samples_only():
    proto = depthwise_chain()
    x = np.random.default_rng(4).standard_normal((12, 1, 3, 8, 8)).astype(np.float32)

    def run(samples):
        return optimize(proto, f"calibrate,bias-correct{{mode=empirical,samples={samples}}}",
                        calibration_data=lambda: iter({"x": s} for s in x))

    assert serialized(run(8).model) == serialized(run(8).model)
    assert run(8).stats("bias-correct")["samples"] == 8  # calibrate read all 12
    assert run(64).stats("bias-correct")["samples"] == 12
    assert serialized(run(12).model) != serialized(run(8).model)


def test_the_layers_left_float_are_decided_once_for_the_corrections_and_the_model(caplog):
    """quant on the test encoder with outlier channels keeps its two most sensitive layers float (min-sqnr=20).
    bias-correct decides that on its quantized copy, measures the others with those two float, and insert-qdq
    keeps the same two instead of deciding again on the corrected model (where the corrections would not fit)."""
    from tests.quant.test_smooth import feeds_for, with_outliers
    from tests.quant.torch_models import encoder_proto

    proto = with_outliers(encoder_proto())
    with caplog.at_level("INFO", logger="irtool"):
        result = optimize(proto, "quant", calibration_data=[feeds_for(proto, i) for i in range(8)])
    kept = result.stats("bias-correct")["layers_kept_float"]
    assert len(kept) == 2 and result.stats("insert-qdq")["layers_kept_float"] == kept
    assert "keeping the 2 layer(s) bias-correct measured in float" in caplog.text  # no second sweep
    assert "may not fit" not in caplog.text
    assert "irtool.kept_float" not in result.model.metadata
    without = optimize(proto, "quant{min-sqnr=0}", calibration_data=[feeds_for(proto, i) for i in range(8)])
    assert without.stats("bias-correct")["layers_kept_float"] == without.stats("insert-qdq")["layers_kept_float"] == []


def _two_output_chain() -> onnx.ModelProto:
    """depthwise_chain with its first activation a model output too: an output made before the last layer."""
    proto = depthwise_chain()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("act1", onnx.TensorProto.FLOAT, None))
    return proto


def _worst_output_sqnr(reference: onnx.ModelProto, test: onnx.ModelProto, x: np.ndarray) -> float:
    names = [o.name for o in reference.graph.output]
    found = []
    for proto in (reference, test):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        runs = [session.run(names, {"x": s}) for s in x]
        found.append([np.concatenate([r[i] for r in runs]).astype(np.float64) for i in range(len(names))])
    return min(sqnr_db(y, q) for y, q in zip(*found, strict=True))


def test_the_min_sqnr_check_measures_the_corrected_model_that_is_written(caplog):
    """With min-sqnr alone, bias-correct quantizes every layer, corrects them, and checks the output SQNR of that
    model over the samples it measured on: the model insert-qdq then writes. Its outputs come from the nodes after
    the last layer (an output made before it is kept until then), the float ones from the reference pass."""
    proto = _two_output_chain()
    x = np.random.default_rng(12).standard_normal((24, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    with caplog.at_level("INFO", logger="irtool"):
        result = optimize(proto, "calibrate,bias-correct{mode=empirical,samples=16,min-sqnr=10},"
                          "insert-qdq{min-sqnr=10}", calibration_data=data)
    stats = result.stats("bias-correct")
    assert stats["layers_kept_float"] == [] and result.stats("insert-qdq")["layers_kept_float"] == []
    assert "mixed precision:" not in caplog.text  # insert-qdq's own check ran nowhere
    assert stats["samples_checked"] == 16
    written = _worst_output_sqnr(proto, result.model.to_proto(), x[:16])
    assert abs(stats["output_sqnr"] - written) < 0.01, (stats["output_sqnr"], written)
    assert stats["output_sqnr"] != round(_worst_output_sqnr(proto, result.model.to_proto(), x[16:]), 2)


def test_the_min_sqnr_check_keeps_the_float_outputs_of_the_samples_that_fit_the_memory_bound():
    """wide_chain's float output is 32 KB per sample: with memory-mb=1 the check keeps those of the first 32 of
    64 samples (as the pieces keep their values), and measures the written model over those."""
    proto = wide_chain()
    x = np.random.default_rng(14).standard_normal((64, 1, 3, 32, 32)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    result = optimize(proto, "calibrate,bias-correct{mode=empirical,memory-mb=1,min-sqnr=0},insert-qdq{min-sqnr=0}",
                      calibration_data=data)
    stats = result.stats("bias-correct")
    assert stats["samples"] == 64 and stats["samples_checked"] == 32
    written = _worst_output_sqnr(proto, result.model.to_proto(), x[:32])
    assert abs(stats["output_sqnr"] - written) < 0.01, (stats["output_sqnr"], written)


def test_a_model_that_reaches_min_sqnr_once_corrected_keeps_every_layer_quantized():
    """The MobileNet-like digits net: plain INT8 is under 33 dB on the calibration samples, so insert-qdq alone
    keeps layers float for min-sqnr=33; corrected, every layer quantized reaches it, and the model written keeps
    none float (before, bias-correct decided on the uncorrected copy and kept some)."""
    proto, data = trained("mobilenet")
    x_calib = data["calib"][0]
    start = "cleanup,fold-bn,calibrate{method=minmax},"
    alone = optimize(proto, start + "insert-qdq{min-sqnr=33}", calibration_data=calibration(x_calib))
    assert alone.stats("insert-qdq")["layers_kept_float"]
    both = optimize(proto, start + "bias-correct{mode=empirical,min-sqnr=33},insert-qdq{min-sqnr=33}",
                    calibration_data=calibration(x_calib))
    assert both.stats("bias-correct")["output_sqnr"] >= 33
    assert both.stats("bias-correct")["layers_kept_float"] == both.stats("insert-qdq")["layers_kept_float"] == []


def test_a_corrected_model_short_of_min_sqnr_is_measured_again_with_the_sweeps_layers_float(caplog):
    """Short of the target once corrected, the layers to keep float are those insert-qdq's sweep picks on the
    uncorrected model (as insert-qdq alone picks them), and the others are measured again with those float."""
    proto = depthwise_chain()
    x = np.random.default_rng(13).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    corrected = optimize(proto, "calibrate,bias-correct{mode=empirical,min-sqnr=0}", calibration_data=data)
    target = corrected.stats("bias-correct")["output_sqnr"] + 3
    alone = optimize(proto, f"calibrate,insert-qdq{{min-sqnr={target}}}", calibration_data=data)
    with caplog.at_level("INFO", logger="irtool"):
        both = optimize(proto, f"calibrate,bias-correct{{mode=empirical,min-sqnr={target}}},"
                        f"insert-qdq{{min-sqnr={target}}}", calibration_data=data)
    kept = both.stats("bias-correct")["layers_kept_float"]
    assert kept and kept == alone.stats("insert-qdq")["layers_kept_float"]
    assert both.stats("insert-qdq")["layers_kept_float"] == kept
    assert f"< min-sqnr={target}: deciding which layers stay float" in caplog.text
    assert "output_sqnr" not in both.stats("bias-correct")
    assert both.stats("bias-correct")["layers_measured"] == 3 - len(kept)


def test_insert_qdq_given_other_mixed_precision_options_than_bias_correct_decides_by_its_own_and_warns(caplog):
    """A hand-written pipeline whose bias-correct and insert-qdq disagree on min-sqnr: insert-qdq follows its own
    options (all layers quantized, or its own sweep) and says the corrections may not fit."""
    from tests.quant.test_smooth import feeds_for, with_outliers
    from tests.quant.torch_models import encoder_proto

    proto = with_outliers(encoder_proto())
    data = [feeds_for(proto, i) for i in range(8)]
    start = "fold-constants{keep-shared=false},calibrate{profile=ort-cpu},"
    with caplog.at_level("WARNING", logger="irtool"):
        only_bias = optimize(proto, start + "bias-correct{mode=empirical,min-sqnr=20},insert-qdq",
                             calibration_data=data)
    assert only_bias.stats("bias-correct")["layers_kept_float"]
    assert not only_bias.stats("insert-qdq")["layers_kept_float"]
    assert "(min-sqnr=20.0, keep-fp=0), insert-qdq decides with min-sqnr=None, keep-fp=0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="irtool"):
        only_insert = optimize(proto, start + "bias-correct{mode=empirical},insert-qdq{min-sqnr=20}",
                               calibration_data=data)
    assert not only_insert.stats("bias-correct")["layers_kept_float"]
    assert only_insert.stats("insert-qdq")["layers_kept_float"]  # its own sweep
    assert "with 0 layer(s) float (min-sqnr=None, keep-fp=0), insert-qdq decides with min-sqnr=20.0" in caplog.text


def test_a_kept_float_list_from_before_the_options_were_recorded_is_adopted():
    """A model saved between bias-correct and insert-qdq by an irtool that recorded the layers alone."""
    import json

    x = np.random.default_rng(11).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    calibrated = optimize(depthwise_chain(), "calibrate", calibration_data=data).model
    calibrated.metadata["irtool.kept_float"] = json.dumps(["dw"])
    result = optimize(calibrated.to_proto(), "insert-qdq{min-sqnr=20}", calibration_data=data)
    assert result.stats("insert-qdq")["layers_kept_float"] == ["dw"]


def test_an_excluded_layer_keeps_its_bias_and_the_others_are_measured_with_it_float():
    """exclude=^dw$ reaches bias-correct's copy: the depthwise conv stays float there and in the model, keeps its
    original bias, and the convs around it match the float means with it float."""
    proto = depthwise_chain()
    x = np.random.default_rng(5).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    text = "calibrate,bias-correct{mode=empirical,exclude=[^dw$]},insert-qdq{exclude=[^dw$]}"
    result = optimize(proto, text, calibration_data=data)
    out = result.model.to_proto()
    original = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    dw = next(n for n in out.graph.node if n.name == "dw")
    np.testing.assert_array_equal(values[dw.input[2]], original["dw.b"])
    assert result.stats("insert-qdq")["layers_quantized"] == result.stats("bias-correct")["layers_measured"] == 2
    for name in ("expand", "y"):  # per sample: the model's batch is 1
        reference = np.mean([_means(proto, {name: 1}, s)[name] for s in x], axis=0)
        measured = np.mean([_means(out, {name: 1}, s)[name] for s in x], axis=0)
        np.testing.assert_allclose(measured, reference, atol=2e-3)


def test_pieces_keep_at_most_the_memory_bound_and_average_the_batches_they_keep():
    """Pieces on the float chain with a 1 MB bound: after each cut the values kept fit in it, the batches dropped
    are the last ones, and each mean equals the whole model's over the batches it reports."""
    from irtool.ir.model import Model
    from irtool.passes.quant.bias_empirical import Pieces

    proto = wide_chain()
    x = np.random.default_rng(6).standard_normal((64, 3, 32, 32)).astype(np.float32)
    batches = [x[i:i + 4] for i in range(0, 64, 4)]
    model = Model.from_proto(proto)
    pieces = Pieces(model, lambda: iter({"x": b} for b in batches), 2**20)
    assert pieces.samples() == 64  # the 768 KB of input fit
    outs = {n.outputs[0].name: n.outputs[0] for n in model.graph.nodes if n.op == "Conv"}
    full = dict(zip(outs, _with_outputs(proto, list(outs)).run(list(outs), {"x": x}), strict=True))
    kept = []
    for name, tensor in outs.items():
        mean, count = pieces.mean_until(tensor, 1)
        assert sum(v.nbytes for e in pieces.cache for v in e.values()) <= 2**20
        np.testing.assert_allclose(mean, full[name][:4 * count].mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        kept.append(count)
    # c1 reads the input, which fit; the cuts before c2 and c3 hold a float Relu output, 128 KB per sample and
    # 512 KB per batch of 4: two batches are exactly 1 MB.
    assert kept == [16, 2, 2]


def test_pieces_keep_the_input_batches_that_fit_the_memory_bound(caplog):
    """Input batches of 4 samples (48 KB) under a 100 KB bound: the first two are kept and counted by their inputs."""
    from irtool.ir.model import Model
    from irtool.passes.quant.bias_empirical import Pieces

    x = np.random.default_rng(8).standard_normal((16, 3, 32, 32)).astype(np.float32)
    with caplog.at_level("INFO", logger="irtool"):
        pieces = Pieces(Model.from_proto(wide_chain()), lambda: iter({"x": x[i:i + 4]} for i in range(0, 16, 4)),
                        100_000)
    assert pieces.samples() == 8 and pieces.samples(1) == 4 and len(pieces.cache) == 2
    assert "the first 8 samples fill memory-mb=0" in caplog.text


def test_a_memory_bound_measures_later_layers_on_fewer_samples_against_the_same_float_samples():
    """INT8 chain with memory-mb=1: the first layer is measured on all 64 samples, the last on the first batches
    that fit (the u8 values between the convs); each one's corrected mean in the written model equals the float
    model's over the samples it was measured on. Two runs give the same bytes."""
    proto = wide_chain()
    x = np.random.default_rng(7).standard_normal((64, 1, 3, 32, 32)).astype(np.float32)

    def run():
        return optimize(proto, "calibrate{method=minmax},bias-correct{mode=empirical,memory-mb=1},insert-qdq",
                        calibration_data=lambda: iter({"x": s} for s in x), calib_batch_size=4)

    result = run()
    stats = result.stats("bias-correct")
    assert stats["samples"] == 64 and stats["samples_last"] == 32, stats  # 32 KB of u8 per sample between convs
    assert serialized(result.model) == serialized(run().model)
    out = result.model.to_proto()
    for name, samples in (("c1", stats["samples"]), ("c3", stats["samples_last"])):
        first = x[:samples, 0]
        measured, reference = _means(out, {name: 1}, first)[name], _means(proto, {name: 1}, first)[name]
        spread = _with_outputs(proto, [name]).run([name], {"x": first})[0].std()
        assert np.abs(measured - reference).max() / spread < 1e-3, (name, samples)
    unbounded = optimize(proto, "calibrate{method=minmax},bias-correct{mode=empirical},insert-qdq",
                         calibration_data=lambda: iter({"x": s} for s in x), calib_batch_size=4)
    assert unbounded.stats("bias-correct")["samples_last"] == 64


def test_memory_bound_must_be_positive():
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 8, 8)).astype(np.float32)
    with pytest.raises(PipelineError, match="memory-mb must be >= 1"):
        optimize(depthwise_chain(), "calibrate,bias-correct{mode=empirical,memory-mb=0}",
                 calibration_data=lambda: iter({"x": s} for s in x))


def _dequantized_layer(op: str, x_shape: list[int], weight: np.ndarray, attrs: dict, quantized_input: bool,
                       zero_point: np.ndarray | None = None):
    """x -> (QuantizeLinear -> DequantizeLinear) -> op(DQ per-channel s8 weight, DQ int32 bias) -> y, as
    insert-qdq writes a layer, with the values LinearMean reads: {name: array} for a batch of x."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    channels = weight.shape[0] if op == "Conv" else weight.shape[0 if attrs.get("transB") else 1]
    axis = 0 if op == "Conv" or attrs.get("transB") else 1  # the output channels' axis
    others = tuple(i for i in range(weight.ndim) if i != axis)
    w_scale = (np.abs(weight).max(axis=others, keepdims=True) / 127).astype(np.float32)
    w_q, w_scale = np.round(weight / w_scale), w_scale.reshape(-1)
    inits = [numpy_helper.from_array(w_q.astype(np.int8), "w_q"), numpy_helper.from_array(w_scale, "w_s"),
             numpy_helper.from_array(rng.integers(-500, 500, channels).astype(np.int32), "b_q"),
             numpy_helper.from_array(np.full(channels, 1e-3, np.float32), "b_s"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_s"),
             numpy_helper.from_array(np.array(110, np.uint8) if zero_point is None else zero_point, "x_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=axis),
             helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], axis=0)]
    if quantized_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"])]
    nodes.append(helper.make_node(op, ["x_dq" if quantized_input else "x", "w", "b"], ["y"], name="layer",
                                  **attrs))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op, x_shape, w_shape, attrs", [
    ("Conv", [4, 6, 13, 11], [8, 6, 3, 3], {"pads": [1, 0, 2, 1]}),
    ("Conv", [4, 6, 13, 11], [8, 6, 3, 3], {"strides": [2, 3], "dilations": [2, 1], "pads": [2, 1, 0, 2]}),
    ("Conv", [4, 6, 12, 12], [6, 1, 5, 5], {"group": 6, "strides": [2, 2], "pads": [2, 2, 2, 2]}),
    ("Conv", [4, 6, 12, 12], [9, 2, 3, 3], {"group": 3, "auto_pad": "VALID"}),
    ("Conv", [4, 6, 20], [5, 6, 4], {"strides": [3], "pads": [1, 2]}),
    ("Conv", [3, 4, 2, 9], [5, 4, 3, 3], {"strides": [5, 2], "pads": [4, 1, 4, 1]}),  # a tap reads only padding
    ("Conv", [2, 3, 5, 6, 7], [4, 3, 2, 3, 2], {"strides": [1, 2, 3], "dilations": [2, 1, 2],
                                                "pads": [1, 0, 2, 0, 1, 1]}),
    ("Gemm", [4, 7], [5, 7], {"transB": 1}),
    ("Gemm", [4, 7], [7, 5], {}),
])
def test_a_layers_mean_from_its_input_equals_its_output_mean_in_onnx_runtime(op, x_shape, w_shape, attrs):
    """LinearMean against the layer run in ONNX Runtime on its dequantized u8 input: pads on each side, strides,
    dilations, depthwise and grouped convs, 1-D and 3-D, taps over padding alone, Gemm either way round."""
    _check_linear_mean(op, x_shape, w_shape, attrs, np.array(110, np.uint8))


def test_a_layers_mean_from_its_signed_input_equals_its_output_mean_in_onnx_runtime():
    """s8 activations (the trt profile, and ort-cpu's s8 option) are summed as int16 over batches of up to 256."""
    _check_linear_mean("Conv", [6, 5, 9, 9], [4, 5, 3, 3], {"strides": [2, 1], "pads": [1, 1, 1, 1]},
                       np.array(-7, np.int8))


def _check_linear_mean(op: str, x_shape: list[int], w_shape: list[int], attrs: dict, zero_point: np.ndarray):
    from irtool.ir.model import Model
    from irtool.passes.quant.bias_empirical import LinearMean

    rng = np.random.default_rng(9)
    proto = _dequantized_layer(op, x_shape, rng.standard_normal(w_shape).astype(np.float32), attrs, True, zero_point)
    x = rng.standard_normal(x_shape).astype(np.float32) * 2
    names = ["y", "x_q"]
    got = dict(zip(names, _with_outputs(proto, names).run(names, {"x": x}), strict=True))
    assert got["x_q"].dtype == zero_point.dtype
    model = Model.from_proto(proto)
    nodes = {n.name: n for n in model.graph.nodes}
    pulled = {n.outputs[0].name: n for n in model.graph.nodes if n.outputs[0].name == "x_dq"}
    linear = LinearMean.of(nodes["layer"], pulled)
    total, rows = linear.sums({"x_q": got["x_q"]})
    y = got["y"].astype(np.float64)
    expected = y.reshape(*y.shape[:2], -1).mean(axis=2).sum(axis=0)  # per-sample means, summed over the batch
    assert rows == x_shape[0]
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_layers_linear_mean_does_not_cover_run_in_the_pieces():
    from irtool.ir.model import Model
    from irtool.passes.quant.bias_empirical import LinearMean

    rng = np.random.default_rng(10)
    same = _dequantized_layer("Conv", [1, 2, 6, 6], rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
                              {"auto_pad": "SAME_UPPER"}, True)
    scaled = _dequantized_layer("Gemm", [2, 4], rng.standard_normal((3, 4)).astype(np.float32),
                                {"transB": 1, "alpha": 0.5}, True)
    # A float input: ONNX Runtime ran this Gemm (its weight alone dequantized) as a MatMulNBits, whose own input
    # quantization moved the mean 2% from the float one.
    unquantized = _dequantized_layer("Gemm", [4, 7], rng.standard_normal((7, 5)).astype(np.float32), {}, False)
    for proto in (same, scaled, unquantized):
        model = Model.from_proto(proto)
        pulled = {n.outputs[0].name: n for n in model.graph.nodes if n.outputs[0].name == "x_dq"}
        node = next(n for n in model.graph.nodes if n.name == "layer")
        assert LinearMean.of(node, pulled) is None
