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
