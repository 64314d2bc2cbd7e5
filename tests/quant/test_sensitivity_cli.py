"""`irtool sensitivity`: ranked per-layer SQNR as JSON/text, and the optional bar chart."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.cli.conftest import run_cli
from tests.quant.torch_models import cnn_proto


def test_sensitivity_ranks_every_compute_layer(tmp_path):
    model, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(cnn_proto(), str(model))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = run_cli("sensitivity", model, "--calib-data", calib, "--calib-batch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    layers = data["layers"]
    assert [layer["op"] for layer in layers].count("Conv") == 3 and len(layers) == 4
    sqnrs = [layer["sqnr_db"] for layer in layers]
    assert sqnrs == sorted(sqnrs)  # most sensitive first
    assert data["full_model_sqnr_db"] <= min(sqnrs)  # all layers together cost more than any one
    text = run_cli("sensitivity", model, "--calib-data", calib, "--calib-batch-size", "2",
                   "--plot", tmp_path / "chart.png")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].split() == ["rank", "SQNR", "dB", "op", "layer"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_float16_model_is_ranked_as_its_float32_computation(tmp_path):
    """Every layer read inf dB on a float16 model before: INT8 placement takes float32, nothing was quantized."""
    from irtool.api import optimize

    model, calib = tmp_path / "cnn16.onnx", tmp_path / "calib.npz"
    onnx.save(optimize(cnn_proto(), "fp16").model.to_proto(), str(model))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = run_cli("sensitivity", model, "--calib-data", calib, "--calib-batch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["layers"]) == 4 and all(20 < layer["sqnr_db"] < 90 for layer in data["layers"])
    assert 20 < data["full_model_sqnr_db"] < 90


def test_sensitivity_needs_data(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(cnn_proto(), str(model))
    result = run_cli("sensitivity", model)
    assert result.returncode == 2 and result.stderr.startswith("irtool: error: sensitivity needs --calib-data")


def test_output_sqnr_counts_float_outputs_and_not_class_indices():
    """A classifier exported with its ArgMax: a flipped index is not quantization noise of a signal (it added its
    squared distance in classes). Only index outputs: they are what there is to compare."""
    from irtool.passes.quant.sensitivity import output_sqnr

    logits = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    noisy = logits + np.array([[0.0, 0.1, 0.0], [0.0, 0.0, 0.1]])
    index = np.array([2, 0], np.int64)
    flipped = np.array([0, 0], np.int64)
    expected = 10 * np.log10(np.sum(logits ** 2) / 0.02)
    reference = [{"logits": logits, "class": index}]
    assert output_sqnr(reference, [{"logits": noisy, "class": flipped}]) == pytest.approx(expected)
    only_index = output_sqnr([{"class": index}], [{"class": flipped}])
    assert only_index == pytest.approx(10 * np.log10(4.0 / 4.0))


def test_output_sqnr_is_the_worst_outputs():
    """A detector's boxes (pixels) and class scores (0-1): pooled, the boxes' signal hid scores that lost every
    digit (pooled here: 42.7 dB; the worst output reads 0 dB). Each output is measured on its own and the worst
    one counts; an output that is zero in float carries no signal to measure against."""
    from irtool.passes.quant.sensitivity import output_sqnr

    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 640, (2, 100, 4))
    scores = rng.uniform(0, 1, (2, 100, 80))
    zeros = np.zeros((2, 3))
    reference = [{"boxes": boxes, "scores": scores, "mask": zeros}]
    noisy = [{"boxes": boxes + 1.0, "scores": np.zeros_like(scores), "mask": zeros + 1.0}]
    assert output_sqnr(reference, noisy) == pytest.approx(0.0)
    boxes_only = 10 * np.log10(np.sum(boxes ** 2) / boxes.size)
    assert output_sqnr(reference, [{**noisy[0], "scores": scores}]) == pytest.approx(boxes_only)
    assert output_sqnr([{"mask": zeros}], [{"mask": zeros + 1.0}]) == -np.inf


def _boxes_and_scores() -> onnx.ModelProto:
    """boxes = Conv(x) in the hundreds; scores = 1x1 differences of a Relu trunk's near-equal channel pairs, so
    quantizing the trunk's output costs the scores far more than the boxes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    trunk = rng.standard_normal((8, 3, 3, 3)) * 0.5
    trunk[1::2] = trunk[0::2] * 1.2
    pairs = np.zeros((4, 8, 1, 1))
    pairs[np.arange(4), 2 * np.arange(4)], pairs[np.arange(4), 2 * np.arange(4) + 1] = 1.0, -1.0
    weights = {"trunk.w": trunk, "boxes.w": rng.standard_normal((4, 3, 3, 3)) * 100, "scores.w": pairs}
    nodes = [helper.make_node("Conv", ["x", "trunk.w"], ["t0"], name="trunk"),
             helper.make_node("Relu", ["t0"], ["t"], name="relu"),
             helper.make_node("Conv", ["x", "boxes.w"], ["boxes"], name="boxes"),
             helper.make_node("Conv", ["t", "scores.w"], ["scores"], name="scores")]
    graph = helper.make_graph(
        nodes, "boxes_and_scores", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("boxes", "scores")],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def test_min_sqnr_holds_for_every_output():
    """Fully INT8, boxes read 36.2 dB and scores 28.6 (pooled: above 30, so `min-sqnr=30` kept every layer INT8
    before). Now the layers the scores need stay float and both outputs reach the target."""
    import onnxruntime as ort

    from irtool.api import optimize
    from irtool.passes.quant.sensitivity import output_sqnr

    proto = _boxes_and_scores()
    x = np.random.default_rng(0).standard_normal((64, 1, 3, 8, 8)).astype(np.float32)

    def outputs(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [dict(zip(("boxes", "scores"), session.run(None, {"x": s}), strict=True)) for s in x]

    def per_output(test):
        return {n: output_sqnr([{n: r[n]} for r in reference], [{n: t[n]} for t in test]) for n in ("boxes", "scores")}

    def pooled(test):
        return output_sqnr([{"y": np.concatenate([r["boxes"].ravel(), r["scores"].ravel()])} for r in reference],
                           [{"y": np.concatenate([t["boxes"].ravel(), t["scores"].ravel()])} for t in test])

    reference, data = outputs(proto), lambda: iter({"x": s} for s in x)
    full = outputs(optimize(proto, "calibrate,insert-qdq", calibration_data=data).model.to_proto())
    assert per_output(full)["scores"] < 30 < min(pooled(full), per_output(full)["boxes"])
    result = optimize(proto, "calibrate,insert-qdq{min-sqnr=30}", calibration_data=data)
    assert result.records[-1].stats["layers_kept_float"] == ["scores", "trunk"]
    assert min(per_output(outputs(result.model.to_proto())).values()) >= 30


def test_the_full_model_sqnr_does_not_depend_on_how_the_gelu_is_spelled(tmp_path):
    """insert-qdq fuses GELU before it plans; the analysis does too, so its trials quantize what insert-qdq would.
    Before, gelu_new written with x·x (tanh-mul) had its inner x·x quantized in the trials only."""
    from golden._quant_blocks import gelu_mlp

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 4, 8)).astype(np.float32))  # 8 samples
    full = {}
    for spelling in ("tanh-pow", "tanh-mul"):
        path = tmp_path / f"{spelling}.onnx"
        onnx.save(gelu_mlp(spelling), str(path))
        result = run_cli("sensitivity", path, "--calib-data", calib, "--calib-batch-size", "1", "--json")
        assert result.returncode == 0, result.stderr
        full[spelling] = json.loads(result.stdout)["full_model_sqnr_db"]
    assert abs(full["tanh-mul"] - full["tanh-pow"]) < 0.05, full
