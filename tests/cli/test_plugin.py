"""Plugins through the `irtool.passes` entry-point group: the example package works from the CLI,
a plugin that cannot be imported is a one-line PluginError naming it, and a pass that raises is a
one-line PassError naming the pass and the passes before it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from tests.cli.conftest import assert_one_line_error, run_cli


def test_example_plugin_renames_outputs(plugin_env: dict, tiny: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    result = run_cli("opt", tiny, "-o", out, "--passes", "dce,rename-outputs", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    graph = onnx.load(out).graph
    assert [o.name for o in graph.output] == ["out_y"]
    assert graph.node[-1].output == ["out_y"]  # the producer writes the renamed value
    report = json.loads(result.stdout)
    assert report["records"][1] == {**report["records"][1], "name": "rename-outputs", "modified": True,
                                    "stats": {"renamed": 1}, "options": {"prefix": "out_"}}


def test_example_plugin_options_and_idempotence(plugin_env: dict, tiny: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    result = run_cli("opt", tiny, "-o", out, "--pipeline", "rename-outputs{prefix=logits_},"
                     "rename-outputs{prefix=logits_}", "--json", "--verify-each", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert [o.name for o in onnx.load(out).graph.output] == ["logits_y"]
    report = json.loads(result.stdout)
    assert report["pipeline"] == "rename-outputs{prefix=logits_},rename-outputs{prefix=logits_}"
    assert [r["stats"]["renamed"] for r in report["records"]] == [1, 0]


def test_example_plugin_rejects_empty_prefix(plugin_env: dict, tiny: Path, tmp_path: Path):
    result = run_cli("opt", tiny, "-o", tmp_path / "out.onnx", "--pipeline", "rename-outputs{prefix=''}",
                     env=plugin_env)
    assert_one_line_error(result, 2, "rename-outputs", "prefix must not be empty")


def test_passes_lists_plugins_and_marks_broken_ones(plugin_env: dict):
    result = run_cli("passes", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    passes = {p["name"]: p for p in json.loads(result.stdout)["passes"]}
    assert passes["rename-outputs"]["options"] == [{"name": "prefix", "type": "str", "default": "out_",
                                                   "default_text": "out_"}]
    assert passes["rename-outputs"]["summary"] == "Prefix the names of the model's outputs."
    assert "broken-plugin" in passes["broken-pass"]["error"]
    assert "dce" in passes and "error" not in passes["dce"]


def test_broken_plugin_is_one_line_plugin_error(plugin_env: dict, tiny: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    result = run_cli("opt", tiny, "-o", out, "--passes", "dce,broken-pass", env=plugin_env)
    assert_one_line_error(result, 1, "'broken-pass'", "broken-plugin", "broken_plugin:BrokenPass",
                          "ImportError", "libexample.so")
    assert not out.exists()
    # An installed but broken plugin does not get in the way of pipelines that do not use it.
    assert run_cli("opt", tiny, "-o", out, "--passes", "dce", env=plugin_env).returncode == 0


def test_failing_pass_is_one_line_pass_error(plugin_env: dict, tiny: Path, tmp_path: Path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = run_cli("opt", tiny, "-o", out, "--passes", "dce,fail-test", "--report", report, env=plugin_env)
    line = assert_one_line_error(result, 1)
    assert line == "irtool: error: pass 'fail-test' failed after ['dce']: RuntimeError: boom"
    assert not out.exists() and not report.exists()
    debug = run_cli("--debug", "opt", tiny, "-o", out, "--passes", "fail-test", env=plugin_env)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and 'raise RuntimeError("boom")' in debug.stderr
