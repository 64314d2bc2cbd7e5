"""The mission's one-liner: `irtool opt model.onnx --passes prune,quant --calib-data ...` on a trained CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx

from tests.cli.conftest import run_cli
from tests.quant.digits_models import logits
from tests.quant.test_quant_accuracy import trained


def test_prune_then_quant_from_the_command_line(tmp_path):
    proto, data = trained("residual")
    model, out, calib, report = (tmp_path / n for n in ("cnn.onnx", "cnn.opt.onnx", "calib.npz", "report.json"))
    onnx.save(proto, str(model))
    np.savez(calib, x=data["calib"][0])
    result = run_cli("opt", model, "-o", out, "--passes", "prune,quant", "--calib-data", calib,
                     "--report", report, "--verify-each")
    assert result.returncode == 0, result.stderr
    records = json.loads(report.read_text())
    assert [p["name"] for p in records["passes"]][:1] == ["prune"]
    assert [p["name"] for p in records["passes"]][-2:] == ["insert-qdq", "quant-dynamic"]
    assert records["cost_input_shapes"] == {"x": [1, 1, 8, 8]}  # the dynamic batch is costed per sample
    assert records["after"]["macs"] < 0.6 * records["before"]["macs"]
    optimized = onnx.load(str(out))
    int8 = [t for t in optimized.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8) >= 5  # every conv and gemm weight is int8
    x = data["test"][0]
    assert logits(optimized, x).shape == (len(x), 10)
    agreement = (logits(optimized, x).argmax(1) == logits(proto, x).argmax(1)).mean()
    assert agreement > 0.5  # pruning half the channels without recovery costs accuracy, not everything
