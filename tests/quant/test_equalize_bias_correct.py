"""equalize (cross-layer equalization) and bias-correct: exactness, balanced ranges, and the recovery
they bring to per-tensor INT8 of a MobileNet-like depthwise net."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from golden._quant_blocks import depthwise_chain, unbalanced_chain
from irtool.api import optimize
from irtool.errors import InputError
from tests.passes.helpers import run_ort
from tests.prune.digits import calibration
from tests.quant.digits_models import logits, sqnr_db
from tests.quant.test_quant_accuracy import trained


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("build", [unbalanced_chain, depthwise_chain])
def test_equalize_is_exact_and_balances_ranges(build):
    proto = build()
    out = optimize(proto, "equalize", verify_each=True).model.to_proto()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(proto, x), rtol=1e-4, atol=1e-4)
    w = weights(out)
    first = w[next(k for k in w if k.startswith(("conv1.w", "expand.w")))]
    second = w[next(k for k in w if k.startswith(("y.w", "dw.w")))]
    r1 = np.abs(first).reshape(first.shape[0], -1).max(axis=1)
    r2 = (np.abs(second).reshape(second.shape[0], -1).max(axis=1) if second.shape[1] == 1
          else np.abs(np.moveaxis(second, 1, 0)).reshape(second.shape[1], -1).max(axis=1))
    np.testing.assert_allclose(r1, r2, rtol=1e-2)  # each channel's range is shared by both layers


def test_equalize_narrows_per_tensor_quantization_error():
    proto = unbalanced_chain()
    x = np.random.default_rng(1).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    ref = np.concatenate([run(proto, s) for s in x])
    sqnr = {}
    for text in ("calibrate,insert-qdq{per-channel=false}", "equalize,calibrate,insert-qdq{per-channel=false}"):
        out = optimize(proto, text, calibration_data=lambda: iter({"x": s} for s in x)).model.to_proto()
        sqnr[text] = sqnr_db(ref, np.concatenate([run(out, s) for s in x]))
    plain, equalized = sqnr.values()
    assert equalized > plain + 6.0, sqnr


def test_relu6_is_equalized_exactly_through_a_per_channel_bound():
    from golden._quant_blocks import clip_chain

    proto = clip_chain()
    x = {"x": (np.random.default_rng(0).standard_normal((1, 3, 8, 8)) * 20).astype(np.float32)}  # clips a lot
    exact = optimize(proto, "equalize")
    assert exact.records[0].stats == {"pairs": 1, "clips_replaced": 0, "clips_per_channel": 1}
    assert [n.op for n in exact.model.graph.nodes] == ["Conv", "Relu", "Min", "Conv"]
    bound = np.asarray(next(n for n in exact.model.graph.nodes if n.op == "Min").inputs[1].values)
    assert bound.shape == (8, 1, 1) and np.ptp(bound) > 0  # 6 / S_i per channel
    want = run_ort(proto, x)["y"]
    np.testing.assert_allclose(run_ort(exact.model, x)["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lossy = optimize(proto, "equalize{clip-as-relu=true}")
    assert lossy.records[0].stats == {"pairs": 1, "clips_replaced": 1, "clips_per_channel": 0}
    assert [n.op for n in lossy.model.graph.nodes] == ["Conv", "Relu", "Conv"]
    assert optimize(clip_chain(low=-1.0), "equalize").records[0].modified is False


def test_bias_correct_needs_data():
    with pytest.raises(InputError, match="calibration data"):
        optimize(unbalanced_chain(), "bias-correct")


def test_equalize_and_bias_correct_recover_half_of_the_int8_loss_on_mobilenet():
    """Per-tensor weights on a depthwise net with imbalanced channel ranges: where plain INT8 loses the most."""
    proto, data = trained("mobilenet-imbalanced")
    x, x_calib = data["test"][0], data["calib"][0]
    ref = logits(proto, x)
    plain = optimize(proto, "cleanup,fold-bn,calibrate,insert-qdq{per-channel=false}",
                     calibration_data=calibration(x_calib)).model.to_proto()
    fixed = optimize(proto, "cleanup,fold-bn,equalize,calibrate,bias-correct{per-channel=false},"
                            "insert-qdq{per-channel=false}", calibration_data=calibration(x_calib)).model.to_proto()
    noise_plain = np.sum((ref - logits(plain, x)) ** 2)
    noise_fixed = np.sum((ref - logits(fixed, x)) ** 2)
    assert noise_fixed <= 0.5 * noise_plain, (sqnr_db(ref, logits(plain, x)), sqnr_db(ref, logits(fixed, x)))
    y = data["test"][1]
    assert (logits(fixed, x).argmax(1) == y).mean() >= (logits(plain, x).argmax(1) == y).mean()


def _conv_biases(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each Conv's float bias by node name (a quantized one, read through a DequantizeLinear, is left out)."""
    w = weights(proto)
    return {n.name: w[n.input[2]] for n in proto.graph.node if n.op_type == "Conv" and n.input[2] in w}


@pytest.mark.parametrize("options", ["exclude=conv1", "keep-first=true", "keep-fp=1"])
def test_layers_left_float_get_their_original_bias_back(options):
    """bias-correct corrects every layer insert-qdq may quantize; the ones insert-qdq then leaves float (here the
    first conv, by exclusion, keep-first or mixed precision) have no weight rounding to cancel, so they get
    their bias back exactly, while the quantized layer keeps its correction; the record leaves the model."""
    proto = unbalanced_chain()
    x = np.random.default_rng(2).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    original = _conv_biases(proto)
    corrected = optimize(proto, "calibrate,bias-correct", calibration_data=data)
    assert "irtool.bias_correction" in corrected.model.metadata
    before = _conv_biases(corrected.model.to_proto())
    assert all(not np.array_equal(before[k], original[k]) for k in original)
    result = optimize(proto, f"calibrate,bias-correct,insert-qdq{{{options}}}", calibration_data=data)
    out = result.model.to_proto()
    kept = next(r.stats["layers_kept_float"] for r in result.records if r.name == "insert-qdq")
    float_convs = {n.name for n in out.graph.node if n.op_type == "Conv"
                   and not any(p.output[0] == n.input[1] and p.op_type == "DequantizeLinear" for p in out.graph.node)}
    assert len(float_convs) == 1 and (options != "keep-fp=1" or set(kept) == float_convs)
    after = _conv_biases(out)
    assert set(after) == float_convs
    for name in float_convs:
        np.testing.assert_array_equal(after[name], original[name])
    bias_of = {n.name: n.input[2] for n in out.graph.node if n.op_type == "Conv"}
    assert all("_corrected" in bias_of[name] for name in set(original) - float_convs)
    assert "irtool.bias_correction" not in result.model.metadata


def test_sensitivity_is_measured_against_the_float_model_not_the_corrected_one():
    """After bias-correct, a layer's sensitivity is the SQNR, against the original float model's outputs, of the
    model with only that layer quantized (and corrected): the same number insert-qdq with the other layer
    excluded gives. Against the corrected float model it would count the correction itself as noise."""
    from irtool.passes.quant.calibrate import stored_ranges
    from irtool.passes.quant.insert_qdq import ActivationType, Placement, Profile
    from irtool.passes.quant.placement import Selection
    from irtool.passes.quant.sensitivity import layer_sensitivity, output_sqnr
    from irtool.passmanager import PassContext

    proto = unbalanced_chain()
    x = np.random.default_rng(3).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    model = optimize(proto, "calibrate,bias-correct", calibration_data=data).model
    placement = Placement(Profile.ORT_CPU, ActivationType.U8, True, True)
    ctx = PassContext(calibration_data=data)
    got = dict(layer_sensitivity(model, stored_ranges(model), placement, Selection(), ctx))
    reference = [{"y": run(proto, s)} for s in x]
    for layer, other in (("conv1", "y"), ("y", "conv1")):
        only = optimize(proto, f"calibrate,bias-correct,insert-qdq{{exclude=^{other}$}}",
                        calibration_data=data).model.to_proto()
        assert got[layer] == pytest.approx(output_sqnr(reference, [{"y": run(only, s)} for s in x]), abs=1e-6)


def test_a_sensitivity_sweep_reads_the_data_once():
    """Mixed precision runs one trial per layer plus a bisection; the evaluation batches are read once and
    replayed (re-reading synthetic data was a quarter of each trial's time). Before: optimize's check of a Python
    iterable source and calibrate read it once each."""
    proto = unbalanced_chain()
    x = np.random.default_rng(4).standard_normal((6, 1, 3, 8, 8)).astype(np.float32)
    reads = []

    def data():
        reads.append(1)
        return iter({"x": s} for s in x)

    result = optimize(proto, "calibrate,insert-qdq{keep-fp=1}", calibration_data=data)
    assert len(next(r.stats["layers_kept_float"] for r in result.records if r.name == "insert-qdq")) == 1
    assert len(reads) == 3



def test_mixed_precision_ranks_on_a_subset_and_decides_on_all_evaluation_samples(monkeypatch):
    """The per-layer sweep runs on the first SWEEP_SAMPLES evaluation samples (its ONNX Runtime runs were 87% of
    the bench MobileNetV2's 60 s; 32 samples, then 16, gave the same 19 layers kept and the same SQNR, and 16 the
    same 20 on the bench's ResNet-50); the float reference, the full model and every bisection step use
    EVAL_SAMPLES, the first 128 of the data."""
    from irtool.passes.quant import sensitivity

    proto = unbalanced_chain()
    x = np.random.default_rng(4).standard_normal((12, 16, 3, 8, 8)).astype(np.float32)
    seen = []

    def counting_tap(model, names, batches, *args, **kwargs):
        batches = list(batches)
        seen.append(sum(len(b["x"]) for b in batches))
        return sensitivity_tap(model, names, batches, *args, **kwargs)

    sensitivity_tap = sensitivity.tap
    monkeypatch.setattr(sensitivity, "tap", counting_tap)
    result = optimize(proto, "calibrate,insert-qdq{min-sqnr=200}", calibration_data=lambda: iter({"x": s} for s in x))
    layers = len(next(r.stats["layers_kept_float"] for r in result.records if r.name == "insert-qdq"))
    assert sensitivity.EVAL_SAMPLES == 128 and sensitivity.SWEEP_SAMPLES == 16
    assert seen.count(16) == layers == 2  # one sweep trial per layer
    assert set(seen) == {16, 128} and seen[:2] == [128, 128]  # reference, then the fully quantized model


def _conv_model(w: np.ndarray, b: np.ndarray, group: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    cin = w.shape[1] * group
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, cin, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("cout, group", [(6, 1), (12, 4), (8, 8), (16, 8)],
                         ids=["dense", "grouped", "depthwise", "depthwise-x2"])
def test_bias_correct_cancels_the_mean_shift_of_every_conv_grouping(cout, group):
    """With the INT8 weights and the corrected bias, each output channel's mean over the data equals the float
    model's (checked by ONNX Runtime, not by the pass's formula). Inputs are constant over space, so a 3x3
    window's mean is the channel mean exactly. Grouped convs (ResNeXt, RegNet) stopped `quant` with a shape
    error, and a depthwise conv with a channel multiplier took the wrong input means."""
    from irtool.passes.quant.insert_qdq import REDUCED_RANGE, quantize_weight

    rng = np.random.default_rng(5)
    cin = 8
    w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    levels = rng.normal(0.5, 1.0, (32, cin)).astype(np.float32)
    x = np.ascontiguousarray(np.broadcast_to(levels[:, :, None, None], (32, cin, 6, 6)))
    proto = _conv_model(w, b, group)
    corrected = weights(optimize(proto, "bias-correct", calibration_data=[{"x": x}]).model.to_proto())
    bias = next(v for k, v in corrected.items() if k.startswith("b"))
    q, scale = quantize_weight(w, 0, REDUCED_RANGE)
    w_int8 = (q * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    target = run(proto, x).mean((0, 2, 3))
    plain = run(_conv_model(w_int8, b, group), x).mean((0, 2, 3))
    fixed = run(_conv_model(w_int8, bias.astype(np.float32), group), x).mean((0, 2, 3))
    assert np.abs(plain - target).max() > 1e-3  # the rounding shift is there to cancel
    np.testing.assert_allclose(fixed, target, atol=2e-5)


def _linear_on_tokens(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x [batch, tokens, 8] -> MatMul + bias Add -> Relu -> MatMul + bias Add -> Relu -> MatMul (no bias): torch's
    nn.Linear on tokens, twice, then a head."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["g"], name="fc2"),
             helper.make_node("Add", ["g", "b2"], ["c"]), helper.make_node("Relu", ["c"], ["s"]),
             helper.make_node("MatMul", ["s", "w3"], ["y"], name="head")]
    w3 = np.random.default_rng(8).standard_normal((6, 3)).astype(np.float32)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 5, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                                          (b2, "b2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _linear_weights(seed: int = 6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32),
            rng.standard_normal((12, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32))


def _before_head(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The second layer's output (before its Relu), by ONNX Runtime."""
    from onnx import helper

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    return ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]).run(["c"], {"x": x})[0]


def test_bias_correct_cancels_the_mean_shift_of_linear_layers_on_tokens():
    """MatMul + bias Add (nn.Linear on [batch, tokens, features]): the correction goes into the Add's constant,
    in its own shape, and with the INT8 weights each output feature's mean over batch and tokens equals the float
    model's (checked by ONNX Runtime). The second layer reads a Relu output, whose positive mean makes the
    rounding shift large."""
    from irtool.passes.quant.insert_qdq import REDUCED_RANGE, quantize_weight

    w1, b1, w2, b2 = _linear_weights()
    x = (np.random.default_rng(7).standard_normal((32, 5, 8)) + 0.5).astype(np.float32)
    proto = _linear_on_tokens(w1, b1, w2, b2)
    result = optimize(proto, "bias-correct", calibration_data=[{"x": x}])
    stats = next(r.stats for r in result.records if r.name == "bias-correct")
    assert stats["layers"] == 3 and stats["bias_adds_inserted"] == 1  # the head had no bias: it gets an Add
    fixed = weights(result.model.to_proto())
    c1, c2 = (next(v for k, v in fixed.items() if k.startswith(f"{b}_corrected")) for b in ("b1", "b2"))
    assert c1.shape == (12,) and c2.shape == (6,)

    def int8(w):
        q, scale = quantize_weight(w, 1, REDUCED_RANGE)
        return (q * scale.reshape(1, -1)).astype(np.float32)

    target = _before_head(proto, x).mean((0, 1))
    plain = _before_head(_linear_on_tokens(int8(w1), b1, int8(w2), b2), x).mean((0, 1))
    corrected = _before_head(_linear_on_tokens(int8(w1), c1, int8(w2), c2), x).mean((0, 1))
    assert np.abs(plain - target).max() > 5e-3  # the rounding shift is there to cancel
    assert np.abs(corrected - target).max() < np.abs(plain - target).max() / 5


def test_a_linear_layer_left_float_gets_its_bias_add_back():
    """fc1 excluded: insert-qdq puts its Add's original bias back; fc2, quantized, keeps the corrected one."""
    w1, b1, w2, b2 = _linear_weights()
    x = (np.random.default_rng(7).standard_normal((32, 5, 8)) + 0.5).astype(np.float32)
    proto = _linear_on_tokens(w1, b1, w2, b2)
    out = optimize(proto, "calibrate,bias-correct,insert-qdq{exclude=fc1}", calibration_data=[{"x": x}]).model
    fc1 = next(n for n in out.graph.nodes if n.name == "fc1")
    assert fc1.op == "MatMul"
    add = fc1.outputs[0].outputs[0]
    bias = next(t for t in add.inputs if isinstance(t, gs.Constant))
    np.testing.assert_array_equal(np.asarray(bias.values), b1)
    fc2 = next(n for n in out.graph.nodes if n.name == "fc2")
    assert fc2.op == "Gemm"  # quantized, with its Add (and Relu) as one QGemm: the bias in int32
    corrected = weights(optimize(proto, "bias-correct", calibration_data=[{"x": x}]).model.to_proto())
    want = next(v for k, v in corrected.items() if k.startswith("b2_corrected"))
    bias_dq = fc2.inputs[2].inputs[0]
    scale = np.asarray(bias_dq.inputs[1].values, np.float64)
    stored = np.asarray(bias_dq.inputs[0].values).astype(np.float64) * scale
    assert np.abs(stored - want).max() <= scale.max() and np.abs(stored - b2).max() > 1e-3


def _bias_less_mlp(seed: int = 9) -> onnx.ModelProto:
    """x [batch, 5, 8] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> Add(x-side residual): nn.Linear(bias=False)
    three times, as LLaMA-style blocks and many qkv projections have them."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    shapes = {"w1": (8, 16), "w2": (16, 16), "w3": (16, 8)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"), helper.make_node("Add", ["x", "h3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 5, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_bias_less_linear_gets_a_bias_add_that_runs_in_its_qgemm(tmp_path):
    import onnxruntime as ort

    proto = _bias_less_mlp()
    rng = np.random.default_rng(10)
    calib = [{"x": (rng.standard_normal((16, 5, 8)) + 0.3).astype(np.float32)} for _ in range(4)]
    x = (rng.standard_normal((64, 5, 8)) + 0.3).astype(np.float32)
    corrected = optimize(proto, "quant", calibration_data=calib)
    stats = next(r.stats for r in corrected.records if r.name == "bias-correct")
    assert stats["layers"] == 3 and stats["bias_adds_inserted"] == 3
    assert [n.op for n in corrected.model.graph.nodes if n.name in ("fc1", "fc2", "fc3")] == ["Gemm"] * 3
    plain = optimize(proto, "cleanup,calibrate{profile=ort-cpu},insert-qdq{min-sqnr=20}", calibration_data=calib)

    def outputs(model_proto):
        return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0].astype(np.float64)

    ref = outputs(proto)
    shift = {name: np.abs((outputs(r.model.to_proto()) - ref).mean((0, 1))).max()
             for name, r in (("corrected", corrected), ("plain", plain))}
    assert shift["corrected"] < shift["plain"] / 2, shift  # each output feature's mean error


def test_an_excluded_bias_less_linear_loses_the_bias_add_bias_correct_gave_it():
    proto = _bias_less_mlp()
    x = (np.random.default_rng(11).standard_normal((32, 5, 8)) + 0.3).astype(np.float32)
    out = optimize(proto, "calibrate,bias-correct,insert-qdq{exclude=fc2}", calibration_data=[{"x": x}]).model
    fc2 = next(n for n in out.graph.nodes if n.name == "fc2")
    assert fc2.op == "MatMul" and fc2.outputs[0].name == "h2"  # writes its own output again
    assert [n.op for n in fc2.outputs[0].outputs] == ["Relu"]
    assert not any(n.name.startswith("fc2_bias_add") for n in out.graph.nodes)
    assert next(n for n in out.graph.nodes if n.name == "fc1").op == "Gemm"  # quantized: keeps its Add in the QGemm
