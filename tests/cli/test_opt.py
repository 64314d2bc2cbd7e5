"""`irtool opt` end to end: output model, report, JSON summary, instrumentation, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tests.cli.conftest import assert_one_line_error, run_cli, sha256
from tests.cli.models import tiny_model

SHAPE = ("--input-shape", "x:1x3x8x8")
# Conv: 4x8x8 outputs x 27 MACs; Relu and Sigmoid: 1 per element of [1,4,8,8].
CONV_MACS, ELEMENTWISE_MACS = 4 * 8 * 8 * 27, 4 * 8 * 8


def test_opt_writes_model_and_report(tiny: Path, tmp_path: Path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = run_cli("opt", tiny, "-o", out, "--passes", "dce", "--report", report_path, *SHAPE)
    assert result.returncode == 0, result.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]
    report = json.loads(report_path.read_text())
    assert report["pipeline"] == "dce"
    assert report["passes"] == [{"name": "dce", "options": {}}]
    assert report["input"] == str(tiny) and report["output"] == str(out)
    assert report["input_shapes"] == {"x": [1, 3, 8, 8]}
    [record] = report["records"]
    assert record["name"] == "dce" and record["modified"] is True
    assert record["stats"] == {"nodes_removed": 1}
    assert record["seconds"] >= 0
    assert report["before"]["nodes"] == 3 and report["after"]["nodes"] == 2
    assert report["before"]["macs"] == CONV_MACS + 2 * ELEMENTWISE_MACS
    assert report["after"]["macs"] == CONV_MACS + ELEMENTWISE_MACS
    assert report["after"]["params"] == report["before"]["params"] == 4 * 3 * 3 * 3
    assert report["ratios"]["nodes"] == pytest.approx(2 / 3, abs=1e-6)
    assert report["after"]["op_histogram"] == {"Conv": 1, "Relu": 1}
    assert set(report["versions"]) == {"irtool", "onnx", "onnxruntime", "python"}
    assert report["versions"]["onnx"] == onnx.__version__
    # The text summary on stdout carries the same numbers.
    assert "pipeline: dce" in result.stdout
    assert "nodes_removed=1" in result.stdout


def test_report_json_is_sorted_and_stable(tiny: Path, tmp_path: Path):
    reports = []
    for run in range(2):
        path = tmp_path / f"report{run}.json"
        assert run_cli("opt", tiny, "-o", tmp_path / f"o{run}.onnx", "--passes", "dce", "--report", path,
                       "--seed", "7").returncode == 0
        text = path.read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
        reports.append(_without_volatile(json.loads(text)))
    assert reports[0] == reports[1]
    assert reports[0]["seed"] == 7


def _without_volatile(report: dict) -> dict:
    # Timings and the output path are the only fields allowed to differ between these runs.
    report = dict(report, total_seconds=None, output=None)
    report["records"] = [dict(r, seconds=None) for r in report["records"]]
    return report


def test_json_summary_on_stdout(tiny: Path, tmp_path: Path):
    result = run_cli("opt", tiny, "-o", tmp_path / "out.onnx", "--passes", "dce,dce", "--json", *SHAPE)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["pipeline"] == "dce,dce"
    assert [(r["name"], r["modified"]) for r in data["records"]] == [("dce", True), ("dce", False)]
    assert data["after"]["macs"] == CONV_MACS + ELEMENTWISE_MACS
    assert data["ratios"]["params"] == 1.0


def test_opt_is_deterministic_and_leaves_the_input_alone(tiny: Path, tmp_path: Path):
    before = sha256(tiny)
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert run_cli("opt", tiny, "-o", out, "--passes", "dce").returncode == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert sha256(tiny) == before


def test_dump_dir_writes_one_model_per_pass(tiny: Path, tmp_path: Path):
    dumps = tmp_path / "dumps"
    result = run_cli("opt", tiny, "-o", tmp_path / "out.onnx", "--passes", "dce,dce", "--dump-dir", dumps)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dumps.iterdir()) == ["001_dce.onnx", "002_dce.onnx"]
    assert len(onnx.load(dumps / "001_dce.onnx").graph.node) == 2


def test_print_ir_after_prints_ir_to_stderr(tiny: Path, tmp_path: Path):
    result = run_cli("opt", tiny, "-o", tmp_path / "out.onnx", "--passes", "dce", "--print-ir-after", "dce",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert "// IR after dce" in result.stderr
    assert "= Conv[conv](%x, @w)" in result.stderr
    assert "Sigmoid" not in result.stderr.split("// IR after dce")[1]
    json.loads(result.stdout)  # the IR does not pollute the JSON on stdout


def test_verify_each_rejects_an_invalid_input(tmp_path: Path):
    model = tiny_model()
    model.graph.node[1].attribute.append(onnx.helper.make_attribute("bogus", 1))
    bad = tmp_path / "bad_attr.onnx"
    bad.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    assert run_cli("opt", bad, "-o", out, "--passes", "dce").returncode == 0  # not verified: passes through
    out.unlink()
    result = run_cli("opt", bad, "-o", out, "--passes", "dce", "--verify-each")
    assert_one_line_error(result, 1, "the input model is not valid", "bogus")
    assert not out.exists()


def test_verify_each_accepts_a_valid_run(tiny: Path, tmp_path: Path):
    result = run_cli("-v", "opt", tiny, "-o", tmp_path / "out.onnx", "--passes", "dce", "--verify-each")
    assert result.returncode == 0, result.stderr
    assert "pass dce: modified" in result.stderr  # -v logs each pass at INFO
