"""examples/quickstart.py runs end to end (train, export, `irtool opt`, evaluate) in a few seconds and
the optimized model is exactly as accurate as the float PyTorch model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from irtool.pipeline import format_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"cnn.onnx", "cnn.opt.onnx", "report.json", "quickstart.json"}

    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == format_pipeline(parse_pipeline("cleanup,fold-bn"))
    assert [r["name"] for r in report["records"]][-1] == "fold-bn"
    assert report["before"]["op_histogram"]["BatchNormalization"] == 4
    assert "BatchNormalization" not in report["after"]["op_histogram"]
    assert report["after"]["nodes"] == report["before"]["nodes"] - 4
    assert report["before"]["macs"] > 0  # the script passes --input-shape, so MACs are known

    recorded = json.loads((out / "quickstart.json").read_text())
    accuracy = recorded["accuracy"]
    assert accuracy["torch"] > 0.9
    assert accuracy["onnx"] == accuracy["onnx_optimized"] == accuracy["torch"]
    assert accuracy["onnx_pruned_int8"] >= accuracy["onnx"] - 0.03  # 30% fewer MACs and INT8, no training
    small = json.loads((out / "report.pruned.int8.json").read_text())
    assert abs(1 - small["after"]["macs"] / small["before"]["macs"] - 0.3) < 0.06
    assert recorded["compare"]["top1_agreement"] == 1.0
    assert recorded["compare"]["max_abs"] < 1e-4

    printed = re.search(r"test accuracy: onnx ([0-9.]+), optimized onnx ([0-9.]+)", result.stdout)
    assert printed is not None, result.stdout
    assert float(printed.group(2)) == round(accuracy["onnx_optimized"], 4)
    assert f"pipeline: {report['pipeline']}" in result.stdout  # the CLI's report table was shown
