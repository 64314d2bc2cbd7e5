"""convtranspose-to-conv: a ConvTranspose equals a Conv over its output phases followed by DepthToSpace, for every
kernel, stride, padding and output padding it accepts; `quant` runs it, so ONNX Runtime's INT8 model runs the
up-convolution as a QLinearConv (it has no integer ConvTranspose)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes import deconv
from irtool.passes.pipelines import QUANT
from tests.quant.digits_models import sqnr_db
from tests.quant.ort_run import optimized_ops

CASES = [(k, s, p, extra) for k, s, p, extra in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (0, 1, 2), (0, 1))
         if extra < s and p < k]


def _export(module: torch.nn.Module, shape: tuple[int, ...], dynamic_length: bool = False) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {0: "n", 2: "length"} if dynamic_length else {0: "n"}
    torch.onnx.export(module.eval(), (torch.randn(*shape),), buffer, dynamo=False, input_names=["x"],
                      opset_version=17, dynamic_axes={"x": axes})
    return onnx.load_from_string(buffer.getvalue())


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _assert_restores(original: onnx.ModelProto, model: Model) -> None:
    """restore gives back the exported graph: the same nodes, attributes, names and weights, bit for bit."""
    names = sorted(deconv.rewritten(model))
    assert deconv.restore(model, names) == names and not deconv.rewritten(model)
    back = model.to_proto()
    assert [(n.op_type, list(n.input), list(n.output), n.attribute) for n in back.graph.node] == \
        [(n.op_type, list(n.input), list(n.output), n.attribute) for n in original.graph.node]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    restored = {i.name: onnx.numpy_helper.to_array(i) for i in back.graph.initializer}
    assert restored.keys() == weights.keys()
    assert all(np.array_equal(restored[name], weights[name]) for name in weights)
    assert not back.metadata_props


@pytest.mark.parametrize(("k", "s", "p", "extra"), CASES, ids=[f"k{k}s{s}p{p}op{e}" for k, s, p, e in CASES])
def test_the_rewrite_equals_the_conv_transpose(k, s, p, extra):
    torch.manual_seed(k * 100 + s * 10 + p)
    module = torch.nn.ConvTranspose2d(5, 3, k, s, padding=p, output_padding=extra, bias=bool(p % 2))
    proto = _export(module, (2, 5, 6, 7))
    result = optimize(proto, "convtranspose-to-conv{max-macs=100}")
    cut = (k - 2 * p + extra) % s != 0  # an output length no multiple of s: whole phases, then a Slice
    rewritten = result.records[0].stats["rewritten"]
    ops = [n.op for n in result.model.graph.nodes]
    x = np.random.default_rng(k + s + p).standard_normal((3, 5, 6, 7)).astype(np.float32)  # not the export's batch
    reference, out = _run(proto, x), _run(result.model.to_proto(), x)
    assert out.shape == reference.shape
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    if p - (k - 1) <= 0:
        assert rewritten == 1 and ops == (["Conv"] if s == 1 else ["Conv", "DepthToSpace"] + ["Slice"] * cut)
        _assert_restores(proto, result.model)
    else:  # the Conv would need negative padding
        assert rewritten == 0 and ops == ["ConvTranspose"]


CASES_1D = [(k, s, p) for k, s, p in itertools.product((2, 3, 4, 16), (1, 2, 8), (0, 1, 4)) if p < k]


@pytest.mark.parametrize(("k", "s", "p"), CASES_1D, ids=[f"k{k}s{s}p{p}" for k, s, p in CASES_1D])
def test_a_1d_conv_transpose_becomes_a_conv_and_an_interleave(k, s, p):
    """No DepthToSpace for 1-D: Reshape [N, C, s, L], Transpose, Reshape [N, C, L·s]; the length stays dynamic."""
    torch.manual_seed(k + s + p)
    proto = _export(torch.nn.Sequential(torch.nn.ConvTranspose1d(5, 3, k, s, padding=p), torch.nn.LeakyReLU(0.1)),
                    (2, 5, 9), dynamic_length=True)
    result = optimize(proto, "convtranspose-to-conv{max-macs=100}")
    x = np.random.default_rng(k).standard_normal((3, 5, 11)).astype(np.float32)  # another batch and length
    np.testing.assert_allclose(_run(result.model.to_proto(), x), _run(proto, x), rtol=1e-5, atol=1e-5)
    ops = [n.op for n in result.model.graph.nodes]
    interleave = ["Reshape", "Transpose", "Reshape"] + ["Slice"] * ((k - 2 * p) % s != 0)
    if p - (k - 1) > 0:
        assert ops == ["ConvTranspose", "LeakyRelu"]
    else:
        assert ops == (["Conv", "LeakyRelu"] if s == 1 else ["Conv", "LeakyRelu", *interleave])
        _assert_restores(proto, result.model)  # the activation goes back after the ConvTranspose


def test_an_activation_after_it_moves_before_the_depth_to_space():
    proto = _export(torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 2, 2, 2), torch.nn.ReLU()), (1, 4, 3, 3))
    model = optimize(proto, "convtranspose-to-conv").model
    assert [n.op for n in model.graph.nodes] == ["Conv", "Relu", "DepthToSpace"]
    assert model.graph.nodes[2].outputs[0].name == proto.graph.node[-1].output[0]  # the Relu's output name stays


def test_max_macs_bounds_the_zero_taps():
    """Kernel 4, stride 2, pads 1: each phase has 2x2 of the Conv's 3x3 taps, 2.25x the MACs (the default bound)."""
    proto = _export(torch.nn.ConvTranspose2d(4, 2, 4, 2, padding=1), (1, 4, 3, 3))
    assert optimize(proto, "convtranspose-to-conv").records[0].stats["rewritten"] == 1
    assert optimize(proto, "convtranspose-to-conv{max-macs=2}").records[0].stats["rewritten"] == 0


class Decoder(torch.nn.Module):
    def __init__(self, kernel: int, padding: int):
        super().__init__()
        self.a = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(32, 16, kernel, 2, padding=padding)
        self.b = torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.up(torch.relu(self.a(x)))))


class Vocoder(torch.nn.Module):
    """HiFi-GAN's upsampler shape: LeakyReLU, ConvTranspose1d(kernel 2s, stride s, pads s/2), a residual conv."""

    def __init__(self):
        super().__init__()
        self.pre = torch.nn.Conv1d(20, 32, 7, padding=3)
        self.up = torch.nn.ConvTranspose1d(32, 16, 16, 8, padding=4)
        self.res = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.post = torch.nn.Conv1d(16, 1, 7, padding=3)

    def forward(self, x):
        y = self.up(torch.nn.functional.leaky_relu(self.pre(x), 0.1))
        y = y + self.res(torch.nn.functional.leaky_relu(y, 0.1))
        return self.post(torch.nn.functional.leaky_relu(y, 0.1))


def test_quant_runs_a_1d_up_convolution_on_integers(tmp_path):
    torch.manual_seed(0)
    proto = _export(Vocoder(), (1, 20, 16))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 20, 16)).astype(np.float32)} for _ in range(8)]
    quantized = optimize(proto, "quant", calibration_data=calib).model.to_proto()
    ops = optimized_ops(quantized, str(tmp_path / "optimized.onnx"), calib[:1])
    assert not ops["ConvTranspose"] and ops["QLinearConv"] == 4
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # the interleave moves the integers
    kept = optimize(proto, ",".join(p for p in QUANT.split(",") if p != "convtranspose-to-conv"),
                    calibration_data=calib).model.to_proto()
    x = rng.standard_normal((2, 20, 16)).astype(np.float32)
    reference = _run(proto, x)
    rewritten, before = sqnr_db(reference, _run(quantized, x)), sqnr_db(reference, _run(kept, x))
    assert rewritten > 25.0 and abs(rewritten - before) < 0.5  # 26.6 against 26.9 dB with the ConvTranspose kept


@pytest.mark.parametrize(("kernel", "padding"), [(2, 0), (4, 1), (3, 1)])
def test_quant_runs_the_up_convolution_on_integers(tmp_path, kernel, padding):
    torch.manual_seed(0)
    proto = _export(Decoder(kernel, padding), (1, 16, 8, 8))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)} for _ in range(8)]
    quantized = optimize(proto, "quant", calibration_data=calib).model.to_proto()
    ops = optimized_ops(quantized, str(tmp_path / "optimized.onnx"), calib[:1])
    # before: ConvTranspose in float between a DequantizeLinear and a QuantizeLinear, as in quantize_static's model
    assert not ops["ConvTranspose"] and ops["QLinearConv"] == 3 and ops["DepthToSpace"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # the model's input and output only
    x = rng.standard_normal((4, 16, 8, 8)).astype(np.float32)
    assert sqnr_db(_run(proto, x), _run(quantized, x)) > 30.0


class PoseNet(torch.nn.Module):
    """SimpleBaseline's head: kernel-4 stride-2 pads-1 up-convolutions with BatchNorm and ReLU, then heatmaps."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.up = torch.nn.Sequential(*[m for _ in range(2) for m in (torch.nn.ConvTranspose2d(32, 32, 4, 2, 1),
                                                                      torch.nn.BatchNorm2d(32), torch.nn.ReLU())])
        self.head = torch.nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.stem(x))))


def _pose_net() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    torch.manual_seed(0)
    module = PoseNet()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    rng = np.random.default_rng(0)
    return _export(module, (1, 8, 6, 6)), [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
                                           for _ in range(8)]


@pytest.mark.parametrize("tail", ["calibrate{profile=ort-cpu},bias-correct,insert-qdq{exclude-ops=[ConvTranspose]}",
                                  "gptq,calibrate{profile=ort-cpu},insert-qdq{exclude-ops=[ConvTranspose]}"],
                         ids=["bias-correct", "gptq"])
def test_an_excluded_conv_transpose_comes_out_as_it_went_in(tmp_path, tail):
    """exclude-ops=ConvTranspose names the rewritten ones too, and insert-qdq turns them back: the model is the one
    quant makes without the rewrite, node for node and weight for weight (bias-correct's phase corrections and
    gptq's phase roundings are undone first); only the activation scales can differ in the last bit, calibrated on
    float outputs that the phase Conv sums in another order. After gptq they differ more (1.8e-4 relative, and the
    int32 biases computed from them): calibrate measured the model with the phase Convs rounded, which insert-qdq
    gives their float weights back when it turns them into ConvTransposes; every int8 weight is the same."""
    proto, calib = _pose_net()
    rewritten = optimize(proto, f"fp32,cleanup,fold-bn,convtranspose-to-conv,{tail}", calibration_data=calib)
    kept = optimize(proto, f"fp32,cleanup,fold-bn,{tail}", calibration_data=calib)
    assert rewritten.records[-1].stats["convtransposes_restored"] == 2
    got, want = rewritten.model.to_proto(), kept.model.to_proto()
    assert list(got.graph.node) == list(want.graph.node)
    got_weights = {i.name: onnx.numpy_helper.to_array(i) for i in got.graph.initializer}
    want_weights = {i.name: onnx.numpy_helper.to_array(i) for i in want.graph.initializer}
    assert got_weights.keys() == want_weights.keys()
    scale_rtol = 1e-6 if tail.startswith("calibrate") else 1e-3
    for name, values in want_weights.items():
        rtol = 0 if values.dtype == np.int8 or (values.dtype != np.float32 and scale_rtol == 1e-6) else scale_rtol
        np.testing.assert_allclose(got_weights[name], values, rtol=rtol, atol=0)
    ops = optimized_ops(rewritten.model.to_proto(), str(tmp_path / "optimized.onnx"), calib[:1])
    assert ops["ConvTranspose"] == 2 and not ops["DepthToSpace"] and ops["QLinearConv"] == 2  # stem and head


def test_an_up_convolution_mixed_precision_keeps_float_is_a_conv_transpose_again():
    """keep-fp leaves the most sensitive layers float; those that were ConvTransposes run as ConvTransposes (in float
    the phase Conv of kernel 4, stride 2, pads 1 has 2.25x their MACs), the quantized one as Conv + DepthToSpace."""
    proto, calib = _pose_net()
    result = optimize(proto, QUANT.replace("min-sqnr=20", "keep-fp=2"), calibration_data=calib)
    stats = result.stats("insert-qdq")
    float_convtransposes = [n for n in stats["layers_kept_float"] if "ConvTranspose" in n]
    ops = [n.op for n in result.model.graph.nodes]
    assert len(float_convtransposes) == 1 and stats["convtransposes_restored"] == 1  # with the heatmap conv
    assert ops.count("ConvTranspose") == len(float_convtransposes)
    assert ops.count("DepthToSpace") == 2 - len(float_convtransposes)
    assert {n.name for n in result.model.graph.nodes if n.op == "ConvTranspose"} == set(float_convtransposes)
    assert "irtool.convtranspose_to_conv" not in result.model.metadata
    x = np.random.default_rng(1).standard_normal((4, 8, 6, 6)).astype(np.float32)
    assert sqnr_db(_run(proto, x), _run(result.model.to_proto(), x)) > 30.0


def test_a_rewrite_changed_since_stays_a_conv():
    """A phase Conv whose weight a later pass changed (equalize, smooth) no longer splits into one ConvTranspose."""
    proto = _export(torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 2, 4, 2, 1), torch.nn.ReLU()), (1, 4, 3, 3))
    model = optimize(proto, "convtranspose-to-conv").model
    conv = model.graph.nodes[0]
    conv.inputs[1].values = np.asarray(conv.inputs[1].values) * 2.0
    assert deconv.restore(model, deconv.rewritten(model)) == []
    assert [n.op for n in model.graph.nodes] == ["Conv", "Relu", "DepthToSpace"]


def test_sensitivity_names_a_rewritten_up_convolution_as_the_conv_transpose_it_was(tmp_path):
    """A model written after convtranspose-to-conv records its rewrites; `irtool sensitivity` ranks each under the
    ConvTranspose's name and op, as insert-qdq plans it, not as the phase Conv plus DepthToSpace."""
    import json

    from tests.cli.conftest import run_cli

    proto, calib = _pose_net()
    path, data = tmp_path / "rewritten.onnx", tmp_path / "calib.npz"
    onnx.save(optimize(proto, "fp32,cleanup,fold-bn,convtranspose-to-conv").model.to_proto(), str(path))
    np.savez(data, x=np.concatenate([c["x"] for c in calib]))
    result = run_cli("sensitivity", path, "--calib-data", data, "--json")
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    transposes = [n.name for n in proto.graph.node if n.op_type == "ConvTranspose"]
    assert sorted(layer["layer"] for layer in layers if layer["op"] == "ConvTranspose") == sorted(transposes)
    assert len(transposes) == 2 and all(layer["op"] in ("Conv", "ConvTranspose") for layer in layers)


def _outputs(proto: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"x": x}), strict=True))


UP_NETS = {"k2s2": lambda: _export(Decoder(2, 0), (1, 16, 8, 8)),
           "k4s2p1": lambda: _export(Decoder(4, 1), (1, 16, 8, 8)),
           "relu_moved": lambda: _pose_net()[0],
           "1d": lambda: _export(Vocoder(), (1, 20, 16))}


@pytest.mark.parametrize("net", list(UP_NETS))
def test_the_float_copy_holds_each_phase_conv_output_interleaved(net):
    """calibrate's float pass runs the ConvTransposes restored (deconv.float_copy): each renamed value holds the same
    numbers as the rewritten model's (sorted; summed in another order), and the reductions tap.pool_values takes
    from a ConvTranspose's output for its phase Conv's output are that output's per-sample channel means."""
    from irtool.calibration.tap import pool_values, tapped_proto

    model = optimize(UP_NETS[net](), "fp32,cleanup,fold-bn,convtranspose-to-conv").model
    copy, renamed, phases = deconv.float_copy(model)
    assert copy is not model and not deconv.rewritten(copy)
    assert "ConvTranspose" in {n.op for n in copy.graph.nodes} and "Conv" in {n.op for n in model.graph.nodes}
    assert set(phases) <= set(renamed) and len(phases) == len(deconv.rewritten(model))
    moved = sum(n.op == "Relu" and n.inputs[0].name in phases for n in model.graph.nodes)
    assert moved == {"k2s2": 1, "k4s2p1": 1, "relu_moved": 2, "1d": 0}[net]
    assert len(renamed) == len(phases) + moved  # a moved Relu's output: after the ConvTranspose in the copy
    shape = [d if isinstance(d, int) else 3 for d in model.graph.inputs[0].shape]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    want = _outputs(tapped_proto(model, sorted(renamed)), sorted(renamed), x)
    proto = tapped_proto(copy, sorted(renamed.values()))
    reduced = pool_values(proto, {name: 1 for name in phases}, "__test", phases)
    means = sorted(reduced[name].mean for name in phases)
    got = _outputs(proto, sorted(renamed.values()) + means, x)
    for name, there in renamed.items():
        np.testing.assert_allclose(np.sort(got[there], None), np.sort(want[name], None), rtol=1e-5, atol=1e-5)
    for name in phases:
        phase = want[name]
        expected = phase.mean(axis=tuple(range(2, phase.ndim)), keepdims=True)
        np.testing.assert_allclose(got[reduced[name].mean], expected, rtol=1e-5, atol=1e-6)


def test_a_cropped_rewrite_stays_a_conv_in_the_float_copy():
    """Kernel 3, stride 2, pads 1: the phase Conv computes positions the Slice then cuts, which the ConvTranspose
    never computes, so calibrate's float pass keeps it (their range is quantized too)."""
    model = optimize(_export(Decoder(3, 1), (1, 16, 8, 8)), "fp32,cleanup,fold-bn,convtranspose-to-conv").model
    assert deconv.rewritten(model)
    copy, renamed, phases = deconv.float_copy(model)
    assert copy is model and renamed == {} and phases == {}


@pytest.mark.parametrize("net", ["k2s2", "relu_moved", "1d"])
def test_calibrate_on_restored_conv_transposes_gives_the_ranges_and_corrections_of_the_phase_convs(net):
    """calibrate, then bias-correct{mode=empirical}, on a rewritten model: calibrate runs the ConvTransposes and
    records the phase Convs' means from their outputs. The same pipeline on the same graph without the rewrite's
    record (so calibrate runs the phase Convs) gives the same ranges and corrected biases, up to float sums taken in
    another order; both record every layer and run no second float pass."""
    import json

    proto = UP_NETS[net]()
    model = optimize(proto, "fp32,cleanup,fold-bn,convtranspose-to-conv").model
    plain = model.copy()
    del plain.metadata[deconv.METADATA_KEY]
    shape = [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape]
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    passes = "calibrate{profile=ort-cpu},bias-correct{mode=empirical,min-sqnr=20}"
    restored = optimize(model.to_proto(), passes, calibration_data=calib)
    direct = optimize(plain.to_proto(), passes, calibration_data=calib)
    assert restored.stats("calibrate")["convtransposes_restored"] == len(deconv.rewritten(model))
    assert "convtransposes_restored" not in direct.stats("calibrate")
    layers = sum(n.op == "Conv" for n in model.graph.nodes)
    for result in (restored, direct):
        assert result.stats("calibrate")["recorded"] == layers
        assert result.stats("bias-correct")["float_passes"] == 0
        assert result.stats("bias-correct")["layers"] == layers
    got = json.loads(restored.model.metadata["irtool.calibration"])["ranges"]
    want = json.loads(direct.model.metadata["irtool.calibration"])["ranges"]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    weights = {t.name: np.asarray(t.values) for t in direct.model.graph.tensors().values() if hasattr(t, "values")}
    for node in restored.model.graph.nodes:
        if node.op == "Conv" and len(node.inputs) > 2:
            np.testing.assert_allclose(node.inputs[2].values, weights[node.inputs[2].name], rtol=1e-4, atol=1e-5)


def test_histogram_calibration_keeps_the_phase_convs():
    """A histogram's subsample depends on the layout it is taken from, and the phase Conv's output holds every phase
    in its channels: percentile calibration runs the rewritten graph, and its ranges are those of the same graph
    without the rewrite's record, exactly."""
    import json

    model = optimize(UP_NETS["relu_moved"](), "fp32,cleanup,fold-bn,convtranspose-to-conv").model
    plain = model.copy()
    del plain.metadata[deconv.METADATA_KEY]
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(32)]
    results = [optimize(m.to_proto(), "calibrate{method=percentile}", calibration_data=calib) for m in (model, plain)]
    assert results[0].stats("calibrate")["convtransposes_restored"] == 0
    got, want = (json.loads(r.model.metadata["irtool.calibration"])["ranges"] for r in results)
    assert got == want
