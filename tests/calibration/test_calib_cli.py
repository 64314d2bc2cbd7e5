"""Calibration data through `irtool opt --calib-*` and `optimize(calibration_data=...)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from irtool import api
from irtool.api import optimize
from irtool.calibration.data import CalibrationData
from irtool.errors import InputError
from tests.calibration.models import conv_net, write_conv_net
from tests.cli.conftest import assert_one_line_error, run_cli

ACTIVATION = "prune{importance=activation,ratio=0.5}"


def conv_samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def capture_context(monkeypatch) -> list:
    seen = []
    original = api.PassManager.run

    def run(self, model, ctx=None):
        seen.append(ctx)
        return original(self, model, ctx)

    monkeypatch.setattr(api.PassManager, "run", run)
    return seen


# ----------------------------------------------------------------------------------- API
def test_optimize_wraps_a_path_with_samples_seed_batch_and_cache(tmp_path: Path, monkeypatch):
    np.savez(tmp_path / "d.npz", x=conv_samples(10))
    seen = capture_context(monkeypatch)
    optimize(conv_net(), "dce", calibration_data=tmp_path / "d.npz", calib_samples=4, calib_batch_size=3, seed=5,
             calib_cache=tmp_path / "cache")
    data = seen[0].calibration_data
    assert isinstance(data, CalibrationData)
    assert (data.num_samples, data.batch_size) == (4, 3)
    np.testing.assert_array_equal(data.indices, CalibrationData.from_path(
        tmp_path / "d.npz", data.inputs, samples=4, seed=5).indices)
    assert seen[0].calib_cache == str(tmp_path / "cache")


def test_optimize_accepts_lists_of_dicts_and_runs_a_data_driven_pass():
    batches = [{"x": conv_samples(4, seed)} for seed in range(2)]
    result = optimize(conv_net(), ACTIVATION, calibration_data=batches)
    assert result.records[0].stats["channels_removed"] == 4


def test_optimize_checks_the_data_before_any_pass_runs(monkeypatch):
    seen = capture_context(monkeypatch)
    with pytest.raises(InputError, match=r"input 'x': sample 0 \(item 0\) has sample shape \(3, 4, 4\), "
                                         r"the model wants \(3, 8, 8\)"):
        optimize(conv_net(), "dce", calibration_data=[{"x": np.zeros((2, 3, 4, 4), np.float32)}])
    with pytest.raises(InputError, match="need --calib-data"):
        optimize(conv_net(), "dce", calib_samples=3)
    assert seen == []


def test_without_calibration_data_a_data_driven_pass_refuses():
    with pytest.raises(InputError, match="needs calibration data"):
        optimize(conv_net(), ACTIVATION)


# ----------------------------------------------------------------------------------- CLI
def test_cli_bad_calibration_file_is_one_line_naming_the_input(tmp_path: Path):
    model = write_conv_net(tmp_path / "net.onnx")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 4, 4), np.float32))
    result = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--calib-data", tmp_path / "bad.npz", "--passes", "dce")
    assert_one_line_error(result, 2, "input 'x'", "bad.npz", "(3, 4, 4)")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_nan_in_the_data_fails_the_pass_that_reads_it(tmp_path: Path):
    model = write_conv_net(tmp_path / "net.onnx")
    x = conv_samples(6)
    x[4, 1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    result = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--calib-data", tmp_path / "nan.npz",
                     "--pipeline", ACTIVATION)
    assert_one_line_error(result, 2, "pass 'prune'", "input 'x': sample 4 (file nan.npz) holds NaN or Inf")


def test_cli_runs_a_data_driven_pass_on_a_folder_with_a_seeded_subset(tmp_path: Path):
    model = write_conv_net(tmp_path / "net.onnx")
    (tmp_path / "data").mkdir()
    for k in range(3):
        np.save(tmp_path / "data" / f"{k}.npy", conv_samples(4, seed=k))
    result = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--calib-data", tmp_path / "data",
                     "--calib-samples", "5", "--calib-batch-size", "2", "--seed", "3", "--pipeline", ACTIVATION,
                     "--calib-cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "channels_removed=4" in result.stdout


def test_cli_random_calibration_is_explicit_and_warns(tmp_path: Path):
    model = write_conv_net(tmp_path / "net.onnx")
    result = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--calib-data", "random", "--calib-samples", "4",
                     "--pipeline", ACTIVATION)
    assert result.returncode == 0, result.stderr
    assert "irtool: WARNING: calibrating on 4 random samples" in result.stderr
    refused = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--pipeline", ACTIVATION)
    assert_one_line_error(refused, 2, "needs calibration data")


DATA_FILE = """
import numpy as np


def batches():  # seeded: every pass that reads the data must see the same samples
    rng = np.random.default_rng(0)
    for _ in range(3):
        yield {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}


SAMPLES = [{"x": np.full((3, 8, 8), v, np.float32)} for v in (0.5, 1.0, -1.0)]


def needs_a_path(path):
    return []
"""


@pytest.mark.parametrize("name", ["batches", "SAMPLES"])
def test_cli_takes_a_python_data_provider(tmp_path: Path, name: str):
    """--calib-data file.py:NAME: a generator function (called once per pass that reads the data) or a list."""
    model = write_conv_net(tmp_path / "net.onnx")
    (tmp_path / "data.py").write_text(DATA_FILE)
    result = run_cli("opt", model, "-o", tmp_path / "out.onnx", "--calib-data", f"data.py:{name}",
                     "--passes", "quant", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import json

    records = {r["name"]: r["stats"] for r in json.loads(result.stdout)["records"]}
    assert records["calibrate"]["tensors"] > 0 and records["insert-qdq"]["qdq_pairs"] > 0


@pytest.mark.parametrize("spec, fragment", [
    ("data.py:needs_a_path", "--calib-data 'data.py:needs_a_path': needs_a_path must take no arguments"),
    ("data.py:nothing", "--calib-data 'data.py:nothing': data.py has no 'nothing'"),
])
def test_cli_bad_python_data_providers_are_one_line_errors(tmp_path: Path, spec: str, fragment: str):
    model = write_conv_net(tmp_path / "net.onnx")
    (tmp_path / "data.py").write_text(DATA_FILE)
    result = run_cli("opt", model, "-o", "out.onnx", "--calib-data", spec, "--passes", "quant", cwd=tmp_path)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--calib-samples", "3"], "--calib-samples need(s) --calib-data"),
    (["--calib-data", "missing.npz"], "missing.npz: no such file or folder"),
    (["--calib-data", "d.npz", "--calib-preprocess", "size=3"], "--calib-preprocess 'size=3'"),
    (["--calib-data", "d.npz", "--calib-cache", "d.npz"], "--calib-cache d.npz: exists and is not a directory"),
])
def test_cli_calibration_usage_errors(tmp_path: Path, args: list[str], fragment: str):
    model = write_conv_net(tmp_path / "net.onnx")
    np.savez(tmp_path / "d.npz", x=conv_samples(2))
    result = run_cli("opt", model, "-o", "out.onnx", *args, "--passes", "dce", cwd=tmp_path)
    assert_one_line_error(result, 2, fragment)


@pytest.mark.parametrize("passes", ["quant", "calibrate,insert-qdq", "insert-qdq"])
def test_cli_refuses_to_quantize_a_quantized_model(tmp_path: Path, passes: str):
    """A Q/DQ model given to the quantizer again: one line naming what it holds, no output. calibrate found
    nothing to observe on it, and ONNX Runtime, asked for no outputs, returned all of them (a zip error)."""
    model = write_conv_net(tmp_path / "net.onnx")
    np.savez(tmp_path / "x.npz", x=conv_samples(8))
    first = run_cli("opt", model, "-o", tmp_path / "q.onnx", "--calib-data", tmp_path / "x.npz", "--passes", "quant")
    assert first.returncode == 0, first.stderr
    result = run_cli("opt", tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--calib-data", tmp_path / "x.npz",
                     "--passes", passes)
    line = assert_one_line_error(result, 2, "the model is already quantized", "DequantizeLinear, QuantizeLinear")
    assert line.count("already quantized") == 1 and not (tmp_path / "qq.onnx").exists()


def test_calibrate_with_nothing_to_observe_runs_no_inference():
    """A model without a quantizable tensor: no statistics, no Q/DQ, the same outputs (ONNX Runtime is not asked
    for an empty list of outputs, which it answers with every output)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    result = optimize(proto, "calibrate,insert-qdq", calibration_data=[{"x": np.ones((3, 4), np.float32)}])
    calibrate, insert = (r.stats for r in result.records)
    assert calibrate["tensors"] == calibrate["observed"] == 0 and insert["qdq_pairs"] == 0
    assert [n.op_type for n in result.model.to_proto().graph.node] == ["Reshape"]


def test_cli_draws_progress_bars_when_asked_and_not_into_logs(tmp_path: Path):
    """--progress draws tqdm bars on stderr for calibration batches (3 of 16 samples) and the mixed-precision
    sweep's layers (2); by default they follow stderr being a terminal, so a build log (a pipe here) gets none.
    The model written is the same either way."""
    model = write_conv_net(tmp_path / "net.onnx")
    np.savez(tmp_path / "x.npz", x=conv_samples(48))

    def opt(out: str, *extra: str):
        result = run_cli("opt", model, "-o", tmp_path / out, "--calib-data", tmp_path / "x.npz",
                         "--pipeline", "calibrate,insert-qdq{min-sqnr=200}", *extra)
        assert result.returncode == 0, result.stderr
        return result.stderr

    shown = opt("shown.onnx", "--progress")
    assert "calibrating:" in shown and "/3 [" in shown and "quant-sensitivity:" in shown and "/2 [" in shown
    piped = opt("piped.onnx")
    assert "calibrating" not in piped and "quant-sensitivity" not in piped
    assert (tmp_path / "shown.onnx").read_bytes() == (tmp_path / "piped.onnx").read_bytes()
