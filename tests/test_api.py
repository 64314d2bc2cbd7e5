"""irtool.api.optimize: inputs it accepts, what it returns, and the errors it raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from irtool.api import optimize
from irtool.errors import InputError, PipelineError
from irtool.ir.model import Model
from irtool.pipeline import parse_pipeline
from tests.cli.models import tiny_model, write_tiny


def test_optimize_a_model_leaves_the_argument_untouched():
    model = Model.from_proto(tiny_model())
    result = optimize(model, "dce")
    assert [n.op for n in model.graph.nodes] == ["Conv", "Relu", "Sigmoid"]
    assert [n.op for n in result.model.graph.nodes] == ["Conv", "Relu"]
    assert result.model is not model


@pytest.mark.parametrize("kind", ["path", "proto", "pipeline-object"])
def test_optimize_accepts_paths_protos_and_parsed_pipelines(tmp_path: Path, kind: str):
    source = {"path": write_tiny(tmp_path / "m.onnx"), "proto": tiny_model(),
              "pipeline-object": tiny_model()}[kind]
    pipeline = parse_pipeline(" dce , dce ") if kind == "pipeline-object" else " dce , dce "
    result = optimize(source, pipeline, seed=3, input_shapes={"x": [1, 3, 8, 8]})
    assert result.pipeline_text == "dce,dce"
    assert [(r.name, r.modified, r.stats) for r in result.records] == [
        ("dce", True, {"nodes_removed": 1}), ("dce", False, {"nodes_removed": 0})]
    assert result.seed == 3 and result.input_shapes == {"x": [1, 3, 8, 8]}
    assert result.before.total_macs - result.after.total_macs == 4 * 8 * 8  # the dead Sigmoid
    assert result.before.total_params == result.after.total_params == 108


def test_print_ir_after_goes_to_the_printer(tmp_path: Path):
    printed: list[str] = []
    optimize(tiny_model(), "dce", print_ir_after=["dce"], ir_printer=printed.append,
             dump_dir=tmp_path / "dumps")
    assert len(printed) == 1 and printed[0].startswith("// IR after dce\nopset 17\n")
    assert [p.name for p in (tmp_path / "dumps").iterdir()] == ["001_dce.onnx"]


def test_print_ir_after_must_name_a_pass_in_the_pipeline():
    with pytest.raises(PipelineError, match="--print-ir-after 'dec': no such pass in the pipeline"):
        optimize(tiny_model(), "dce", print_ir_after=["dec"])


def test_input_shapes_must_name_model_inputs():
    with pytest.raises(InputError, match="no input of that name"):
        optimize(tiny_model(), "dce", input_shapes={"image": [1, 3, 8, 8]})


def test_unsupported_model_argument():
    with pytest.raises(InputError, match="got int"):
        optimize(42, "dce")


def test_stats_reads_a_pass_by_name_and_names_the_passes_that_ran():
    result = optimize(tiny_model(), "dce,eliminate-identity")
    assert result.stats("dce") == result.records[0].stats
    with pytest.raises(KeyError, match="'insert-qdq' did not run; passes: dce, eliminate-identity"):
        result.stats("insert-qdq")
