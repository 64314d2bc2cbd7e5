"""Every kind of unusable input ends in exit code 2, one stderr line, no traceback and no output file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import assert_one_line_error, run_cli, sha256
from tests.cli.models import BAD_INPUT_MESSAGES, BAD_INPUTS


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tmp_path: Path, kind: str):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = BAD_INPUTS[kind](folder / "model.onnx")
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = run_cli("opt", bad, "-o", out, "--passes", "dce", "--report", report)
    line = assert_one_line_error(result, 2, str(bad), BAD_INPUT_MESSAGES[kind])
    assert not out.exists() and not report.exists(), line
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temporary files left either


@pytest.mark.parametrize("kind", ["truncated", "external-data-dotdot"])
def test_debug_shows_the_traceback(tmp_path: Path, kind: str):
    bad = BAD_INPUTS[kind](tmp_path / "model.onnx")
    result = run_cli("--debug", "opt", bad, "-o", tmp_path / "out.onnx", "--passes", "dce")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "InputError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("irtool: error: ")


@pytest.mark.parametrize("command", [["inspect"], ["show"], ["verify"]])
def test_other_commands_refuse_bad_input_the_same_way(tmp_path: Path, command: list[str]):
    bad = BAD_INPUTS["random-bytes"](tmp_path / "model.onnx")
    assert_one_line_error(run_cli(*command, bad), 2, "not a valid ONNX protobuf")


def test_output_equal_to_input_is_refused(tiny: Path):
    before = sha256(tiny)
    result = run_cli("opt", tiny, "-o", tiny.parent / "." / tiny.name, "--passes", "dce")
    assert_one_line_error(result, 2, "output is the input model")
    assert sha256(tiny) == before


def test_report_over_the_output_is_refused(tiny: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    assert_one_line_error(run_cli("opt", tiny, "-o", out, "--passes", "dce", "--report", out), 2, "report")
    assert not out.exists()


def test_missing_output_folder_is_refused_before_running(tiny: Path, tmp_path: Path):
    out = tmp_path / "nope" / "out.onnx"
    assert_one_line_error(run_cli("opt", tiny, "-o", out, "--passes", "dce"), 2, "folder does not exist")


@pytest.mark.parametrize("shape, fragment", [
    ("x", "expected NAME:DxDxD"),
    ("x:1xAx8x8", "positive integers"),
    ("nope:1x3x8x8", "no input of that name"),
    ("x:1x3x8", "3 dims given"),
])
def test_bad_input_shape(tiny: Path, tmp_path: Path, shape: str, fragment: str):
    result = run_cli("opt", tiny, "-o", tmp_path / "o.onnx", "--passes", "dce", "--input-shape", shape)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_dump_dir_that_is_a_file_is_refused(tiny: Path, tmp_path: Path):
    (tmp_path / "dumps").write_text("")
    result = run_cli("opt", tiny, "-o", tmp_path / "o.onnx", "--passes", "dce", "--dump-dir", tmp_path / "dumps")
    assert_one_line_error(result, 2, "--dump-dir", "not a directory")
    assert not (tmp_path / "o.onnx").exists()
