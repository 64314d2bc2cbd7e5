"""Pruning through the real CLI: `irtool inspect --channel-groups` and `irtool opt --passes prune`."""

from __future__ import annotations

import json

import onnx

from tests.cli.conftest import assert_one_line_error, run_cli
from tests.prune.test_prune_masking import net_proto


def test_inspect_lists_groups_and_lock_reasons(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(net_proto(), str(path))
    data = json.loads(run_cli("inspect", path, "--channel-groups", "--json").stdout)
    groups = data["channel_groups"]
    assert groups["prunable_groups"] == 6 and groups["locked_groups"] == 1
    locked = next(g for g in groups["groups"] if g["locked"])
    assert locked["channels"] == 10 and "graph output" in locked["locked"]
    text = run_cli("inspect", path, "--channel-groups").stdout
    assert "channel groups: 6 prunable, 1 locked" in text
    assert "locked: 'y' is a graph output" in text


def test_opt_prune_halves_macs_and_keeps_the_interface(tmp_path):
    path, out, report = tmp_path / "net.onnx", tmp_path / "net.pruned.onnx", tmp_path / "report.json"
    onnx.save(net_proto(), str(path))
    result = run_cli("opt", path, "-o", out, "--pipeline", "prune{target-macs=0.5}", "--report", report,
                     "--verify-each")
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    before, after = data["before"]["macs"], data["after"]["macs"]
    assert abs((1 - after / before) - 0.5) <= 0.05
    pruned = onnx.load(str(out))
    assert [o.name for o in pruned.graph.output] == ["y"]
    assert [d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim] == [2, 10]


def test_prune_refuses_a_quantized_model_in_one_line(tmp_path):
    """Its weights are DequantizeLinear outputs: the pass used to write the model unchanged, warning only that
    '0 of 0 channel groups are locked'."""
    path, quantized, out = tmp_path / "net.onnx", tmp_path / "net.int8.onnx", tmp_path / "out.onnx"
    onnx.save(net_proto(), str(path))
    assert run_cli("opt", path, "-o", quantized, "--passes", "quant", "--calib-data", "random").returncode == 0
    result = run_cli("opt", quantized, "-o", out, "--passes", "prune")
    assert_one_line_error(result, 2, "prune: the model is already quantized (")
    assert "prune the float model, then quantize it (--passes prune,quant)" in result.stderr
    assert not out.exists()
