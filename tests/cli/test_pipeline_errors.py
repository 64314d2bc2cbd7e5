"""Pipeline and usage mistakes: exit 2 with a message that says what is wrong and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import assert_one_line_error, run_cli


def opt(tiny: Path, tmp_path: Path, *args: str):
    return run_cli("opt", tiny, "-o", tmp_path / "out.onnx", *args)


def test_unknown_pass_suggests_the_closest_name(tiny: Path, tmp_path: Path):
    line = assert_one_line_error(opt(tiny, tmp_path, "--passes", "dec"), 2, "unknown pass 'dec'")
    assert "did you mean 'dce'?" in line
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_option_lists_the_valid_keys(tiny: Path, tmp_path: Path):
    line = assert_one_line_error(opt(tiny, tmp_path, "--pipeline", "dce{ratio=0.5}"), 2, "unknown option 'ratio'")
    assert "column 5" in line and "of pass 'dce'" in line


def test_malformed_pipeline_names_the_column(tiny: Path, tmp_path: Path):
    assert_one_line_error(opt(tiny, tmp_path, "--pipeline", "dce,,dce"), 2, "column 5", "expected a pass name")
    assert_one_line_error(opt(tiny, tmp_path, "--pipeline", "dce{"), 2, "column 5")


def test_options_in_passes_point_to_pipeline(tiny: Path, tmp_path: Path):
    """With the user's own text to paste, not an unrelated example."""
    assert_one_line_error(opt(tiny, tmp_path, "--passes", "quant{min-sqnr=30}"), 2,
                          "--pipeline 'quant{min-sqnr=30}'")
    assert not (tmp_path / "out.onnx").exists()


def test_an_option_no_pass_of_a_named_pipeline_takes(tiny: Path, tmp_path: Path):
    assert_one_line_error(opt(tiny, tmp_path, "--pipeline", "cleanup{ratio=0.5}"), 2, "column 9",
                          "no pass of named pipeline 'cleanup' takes option 'ratio'", "its passes: dce,")


@pytest.mark.parametrize("args", [[], ["--passes", "dce", "--pipeline", "dce"]])
def test_exactly_one_of_passes_and_pipeline(tiny: Path, tmp_path: Path, args: list[str]):
    assert_one_line_error(opt(tiny, tmp_path, *args), 2, "exactly one of --passes and --pipeline")


def test_click_usage_errors_are_one_line_exit_2(tiny: Path):
    assert_one_line_error(run_cli("opt", tiny, "--passes", "dce"), 2, "Missing option")
    assert_one_line_error(run_cli("frobnicate"), 2, "No such command")
    assert_one_line_error(run_cli("bench", tiny, "--runs", "0"), 2, "--runs")


def test_print_ir_after_a_pass_not_in_the_pipeline(tiny: Path, tmp_path: Path):
    assert_one_line_error(opt(tiny, tmp_path, "--passes", "dce", "--print-ir-after", "fold-bn"), 2,
                          "--print-ir-after 'fold-bn'")
