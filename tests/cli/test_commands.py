"""The other commands: passes, inspect, show, verify, compare, bench, --help/--version, python -m."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import onnx

from irtool import registry
from tests.cli.conftest import assert_one_line_error, run_cli
from tests.cli.models import tiny_model

HEAVY = ("onnx", "onnxruntime", "numpy", "onnx_graphsurgeon", "torch")


def test_help_imports_nothing_heavy():
    code = ("import json, sys\n"
            "from irtool.cli import main\n"
            "code = main(['--help'])\n"
            f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    code, heavy = json.loads(result.stdout.splitlines()[-1])
    assert code == 0
    assert heavy == []
    assert "Commands:" in result.stdout and "opt" in result.stdout


def test_python_m_irtool_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: irtool [OPTIONS] COMMAND")
    for command in ("opt", "passes", "inspect", "show", "verify", "compare", "bench"):
        assert f"  {command} " in result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "irtool, version 0.1.0"


def test_passes_lists_every_registered_pass_from_the_registry():
    result = run_cli("passes", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    # Compared with the installed entry points: the test process may have registered extra passes in-process.
    installed = sorted({ep.name for ep in metadata.entry_points(group=registry.PASS_GROUP)})
    assert [p["name"] for p in data["passes"]] == installed
    dce = next(p for p in data["passes"] if p["name"] == "dce")
    assert dce["summary"] == "Remove nodes whose results are never used, and unused initializers."
    assert dce["options"] == []
    pipelines = {p["name"]: p for p in data["pipelines"]}
    assert pipelines["cleanup"]["expansion"] == registry.get_pipeline("cleanup")


def test_passes_text_shows_options_with_type_and_default():
    result = run_cli("passes")
    assert result.returncode == 0, result.stderr
    assert "dce" in result.stdout and "Remove nodes whose results are never used" in result.stdout
    assert "pipelines:" in result.stdout and "cleanup = " in result.stdout
    data = json.loads(run_cli("passes", "--json").stdout)
    for entry in data["passes"]:
        for option in entry.get("options", []):
            assert f"{option['name']}: {option['type']} " in result.stdout


def test_inspect_json_counts_the_model(tiny: Path):
    result = run_cli("inspect", tiny, "--json", "--input-shape", "x:2x3x8x8")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == str(tiny)
    assert data["op_histogram"] == {"Conv": 1, "Relu": 1, "Sigmoid": 1}
    assert data["params"] == data["nonzero_params"] == 108
    assert data["weight_bytes"] == 108 * 4
    assert data["macs"] == 2 * (4 * 8 * 8 * 27 + 2 * 4 * 8 * 8)
    assert data["inputs"] == [{"name": "x", "dtype": "f32", "shape": [2, 3, 8, 8]}]
    assert data["outputs"] == [{"name": "y", "dtype": "f32", "shape": [2, 4, 8, 8]}]
    assert data["peak_activation_bytes"] > 0


def test_inspect_text(tiny: Path):
    result = run_cli("inspect", tiny)
    assert result.returncode == 0, result.stderr
    assert "x: f32[N,3,8,8]" in result.stdout
    assert "weight bytes" in result.stdout and "432 B" in result.stdout


def test_inspect_counts_a_symbolic_batch_as_one_and_says_so(tiny: Path):
    """Costs per sample, as `irtool opt` reports them: the batch N left every MAC unknown (macs 0)."""
    data = json.loads(run_cli("inspect", tiny, "--json").stdout)
    assert data["macs"] == 4 * 8 * 8 * 27 + 2 * 4 * 8 * 8 and data["cost_input_shapes"] == {"x": [1, 3, 8, 8]}
    assert data["unknown_macs"] == []
    text = run_cli("inspect", tiny).stdout
    assert "costs per input of x:1x3x8x8 (symbolic dims counted as 1; --input-shape to choose)" in text
    assert "costs per input" not in run_cli("inspect", tiny, "--input-shape", "x:2x3x8x8").stdout


def test_show_prints_the_textual_ir(tiny: Path):
    result = run_cli("show", tiny, "--input-shape", "x:1x3x8x8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "opset 17"
    assert lines[1] == "graph g (%x: f32[1,3,8,8]) -> (%y: f32[1,4,8,8])"
    assert "  %y : f32[1,4,8,8] = Relu[relu](%c)" in lines


def test_verify_ok_and_not_ok(tiny: Path, tmp_path: Path):
    ok = run_cli("verify", tiny)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{tiny}: ok (3 nodes, opset 17)"
    model = tiny_model()
    model.graph.node[0].input[0] = "nowhere"
    bad = tmp_path / "dangling.onnx"
    bad.write_bytes(model.SerializeToString())
    assert_one_line_error(run_cli("verify", bad), 1, "'nowhere'")


def test_compare_identical_and_different(tiny: Path, tmp_path: Path):
    same = run_cli("compare", tiny, tiny, "--json", "--samples", "2")
    assert same.returncode == 0, same.stderr
    data = json.loads(same.stdout)
    assert data["ok"] is True and data["samples"] == 2
    assert data["outputs"]["y"]["max_abs"] == 0.0 and data["outputs"]["y"]["sqnr_db"] == "inf"
    model = tiny_model()
    model.graph.node[1].op_type = "Sigmoid"  # same interface, different numbers
    other = tmp_path / "other.onnx"
    other.write_bytes(model.SerializeToString())
    different = run_cli("compare", tiny, other)
    assert_one_line_error(different, 1, "outputs differ beyond")
    assert "DIFFERENT" in different.stdout


def test_bench_json(tiny: Path):
    result = run_cli("bench", tiny, "--runs", "3", "--warmup", "1", "--json", "--input-shape", "x:1x3x8x8")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runs"] == 3 and data["threads"] == 1
    assert 0 < data["min_ms"] <= data["median_ms"] <= data["p90_ms"]



def test_unexpected_exception_is_one_line_internal_error(monkeypatch, capsys, tiny: Path, tmp_path: Path):
    import irtool.api
    from irtool.cli import main

    def explode(*args, **kwargs):
        raise ValueError("something irtool did not expect")

    monkeypatch.setattr(irtool.api, "optimize", explode)
    code = main(["opt", str(tiny), "-o", str(tmp_path / "out.onnx"), "--passes", "dce"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.splitlines() == [
        "irtool: error: internal error: ValueError: something irtool did not expect "
        "(run with --debug for the traceback)"]
    assert not (tmp_path / "out.onnx").exists()
    assert main(["--debug", "opt", str(tiny), "-o", str(tmp_path / "out.onnx"), "--passes", "dce"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_broken_pipe_is_not_an_error(tmp_path: Path):
    # Far more IR text than a pipe buffer holds, so `head` closes the pipe while irtool still writes
    # (click's main handles EPIPE; this guards that our error mapping keeps it that way).
    x = onnx.helper.make_tensor_value_info("v0", onnx.TensorProto.FLOAT, [1])
    nodes = [onnx.helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"relu{i}") for i in range(3000)]
    y = onnx.helper.make_tensor_value_info("v3000", onnx.TensorProto.FLOAT, [1])
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "chain", [x], [y]), ir_version=10,
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "chain.onnx"
    path.write_bytes(model.SerializeToString())
    command = f'"{sys.executable}" -m irtool show "{path}" | head -c 10'
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.stdout == "opset 17\ng"
    assert result.stderr == ""
    assert result.returncode == 0
