"""irtool.report: the JSON schema, deterministic output, ratios, text tables and atomic writing."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import numpy as np

from irtool import report as rep
from irtool.api import optimize
from irtool.passmanager import PassRecord
from tests.cli.models import tiny_model


def make_report() -> dict:
    result = optimize(tiny_model(), "dce", input_shapes={"x": [1, 3, 8, 8]})
    return rep.build_report(result, "in.onnx", "out.onnx")


def test_report_fields():
    report = make_report()
    assert report["schema"] == rep.SCHEMA_VERSION
    assert (report["input"], report["output"], report["pipeline"]) == ("in.onnx", "out.onnx", "dce")
    assert report["before"]["nodes"] == 3 and report["after"]["nodes"] == 2
    assert report["before"]["op_histogram"] == {"Conv": 1, "Relu": 1, "Sigmoid": 1}
    assert report["ratios"]["nodes"] == round(2 / 3, 6)
    assert report["after"]["unknown_macs"] == []
    assert report["total_seconds"] == report["records"][0]["seconds"]


def test_to_json_is_sorted_and_identical_without_timings():
    texts = []
    for _ in range(2):
        report = make_report()
        report["total_seconds"] = 0.0
        for record in report["records"]:
            record["seconds"] = 0.0
        texts.append(rep.to_json(report))
    assert texts[0] == texts[1]
    assert texts[0] == json.dumps(json.loads(texts[0]), sort_keys=True, indent=2) + "\n"


def test_ratio_is_null_without_a_baseline():
    before = {key: 0 for key in rep.RATIO_METRICS}
    after = dict(before, params=5)
    assert rep.ratios(before, after) == {key: None for key in rep.RATIO_METRICS}
    assert rep.ratios(dict(before, params=4), after)["params"] == 1.25


class Color(enum.Enum):
    RED = "red"


def test_jsonable_turns_option_and_stat_values_into_plain_json():
    values = {"e": Color.RED, "t": ("a", 1), "i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True),
              "n": None, "s": type("Regex", (str,), {})("^x$")}
    assert rep.jsonable(values) == {"e": "red", "t": ["a", 1], "i": 3, "f": 0.5, "b": 1, "n": None, "s": "^x$"}
    record = PassRecord("p", {"round_to": 8, "method": Color.RED}, True, 0.1, {"removed": np.int64(2)})
    assert rep.record_dict(record)["options"] == {"method": "red", "round-to": 8}
    assert json.dumps(rep.record_dict(record))  # serializable


def test_text_form_has_metrics_passes_and_histogram_changes():
    text = rep.format_text(make_report())
    lines = text.splitlines()
    assert lines[1] == "pipeline: dce"
    assert lines[3].split() == ["metric", "before", "after", "ratio"]
    assert lines[4].split() == ["nodes", "3", "2", "0.667"]
    [record] = [line.split() for line in lines if line.split()[:2] == ["1", "dce"]]
    assert record[2] == "yes" and float(record[3]) >= 0 and record[4] == "nodes_removed=1"
    assert any(line.split() == ["Sigmoid", "1", "0"] for line in lines)
    assert "MACs unknown" not in text


def test_text_form_says_where_the_opset_was_upgraded():
    """On load below opset 13; by the pipeline where fp16 took a quantized model to opset 19 (it said "on load")."""
    report = make_report()
    cases = {(11, 13): "on load", (17, 19): "by the pipeline", (11, 19): "on load and by the pipeline"}
    for (before, after), where in cases.items():
        report["opset"] = {"input": before, "output": after}
        assert rep.format_text(report).splitlines()[2] == f"opset: {before} -> {after} (upgraded {where})"
    report["opset"] = {"input": 17, "output": 17}
    assert not [line for line in rep.format_text(report).splitlines() if line.startswith("opset:")]


def test_write_report_is_atomic_and_replaces(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text("old")
    report = make_report()
    rep.write_report(report, path)
    assert json.loads(path.read_text())["pipeline"] == "dce"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_human_bytes():
    assert [rep.human_bytes(n) for n in (0, 1023, 1024, 3 * 1024**2, 5 * 1024**3)] == \
        ["0 B", "1023 B", "1.00 KiB", "3.00 MiB", "5.00 GiB"]
