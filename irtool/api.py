"""The library entry point: `optimize(model, pipeline)` runs a pipeline and measures the model before
and after. The CLI's `irtool opt` is a thin layer over it (loading, writing and printing only).

The caller's model is never mutated: a `Model` argument is copied first, so `result.model` and the
argument can be compared or saved side by side.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from irtool.errors import InputError, PipelineError
from irtool.ir.model import Model
from irtool.ir.skeleton import symbol_sizes
from irtool.passmanager import PassContext, PassManager, PassRecord
from irtool.pipeline import Pipeline, format_pipeline, parse_pipeline

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """What `optimize` produced: the new model, one record per pass and the cost before and after."""

    model: Model
    records: list[PassRecord]
    pipeline: Pipeline
    pipeline_text: str
    before: Any  # irtool.analysis.cost.CostReport
    after: Any
    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    cost_input_shapes: dict[str, list[int]] = field(default_factory=dict)  # symbolic dims counted as 1

    def stats(self, pass_name: str) -> dict[str, Any]:
        """The stats of the last run of the pass `pass_name` (named pipelines expand to passes: `quant` ends with
        quant-dynamic, so its insert-qdq stats are stats("insert-qdq"), not records[-1])."""
        for record in reversed(self.records):
            if record.name == pass_name:
                return record.stats
        raise KeyError(f"{pass_name!r} did not run; passes: {', '.join(r.name for r in self.records)}")


def optimize(model_or_path: Model | Any | str | os.PathLike, pipeline: str | Pipeline, *, seed: int = 0,
             input_shapes: Mapping[str, list[int]] | None = None, verify_each: bool = False,
             print_ir_after: Iterable[str] = (), dump_dir: str | os.PathLike | None = None,
             calibration_data: Any = None,
             ir_printer: Callable[[str], None] | None = None, calib_samples: int | None = None,
             calib_batch_size: int | None = None, calib_preprocess: str | None = None,
             calib_cache: str | os.PathLike | None = None, progress: bool = False,
             example_inputs: Any = None) -> OptimizeResult:
    """Run `pipeline` (text or parsed) on a copy of the model; raise a typed IrtoolError on failure.

    The model is a path, an onnx.ModelProto, an irtool Model, or a torch.nn.Module with `example_inputs` (a
    tensor, a tuple of them, or a dict of them by forward's parameter names), exported by
    irtool.frontends.torch.export_module with its defaults (dynamo, falling back to the TorchScript tracer;
    dynamic batch; input names from forward's parameters).

    `ir_printer` receives the IR text for `print_ir_after`; by default it is logged at INFO.
    `calibration_data` is a CalibrationData, a path (.npz file, folder of .npy/.npz files or images),
    "random", or a list / zero-argument callable of {input name: array} dicts; it is validated against
    the model's inputs before any pass runs (irtool.calibration.data). `calib_samples` picks a subset
    seeded by `seed`; `calib_cache` is a folder for calibration statistics. `progress` draws progress bars
    of long work (calibration, sensitivity sweeps) on stderr.
    """
    from irtool.analysis.cost import model_cost
    from irtool.analysis.shapes import concrete_input_shapes
    from irtool.calibration.data import as_calibration_data

    parsed = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    _check_print_ir_after(parsed, print_ir_after)
    shapes = {name: list(dims) for name, dims in (input_shapes or {}).items()}
    model = load_model(model_or_path, example_inputs)
    if model.source_opset < model.opset:
        log.warning("%s: opset %d upgraded to %d on load (onnx.version_converter); the output is opset %d",
                    model.source or "<model>", model.source_opset, model.opset, model.opset)
    check_input_shapes(model, shapes)
    passes = parsed.build()
    # Costs are per sample where dims are symbolic (a dynamic batch counts as 1), so MACs are never
    # "unknown" just because the export kept the batch dynamic; the report states the shapes used.
    cost_shapes = concrete_input_shapes(model, shapes)
    before = model_cost(model, cost_shapes)
    calibration = as_calibration_data(calibration_data, model, samples=calib_samples, seed=seed,
                                      batch_size=calib_batch_size, preprocess=calib_preprocess,
                                      input_shapes=shapes)
    ctx = PassContext(seed=seed, input_shapes=shapes, calibration_data=calibration,
                      calib_cache=None if calib_cache is None else os.fspath(calib_cache), progress=progress)
    manager = PassManager(passes, verify_each=verify_each, print_ir_after=print_ir_after,
                          dump_dir=dump_dir, ir_printer=ir_printer)
    records = manager.run(model, ctx)
    after = model_cost(model, cost_shapes)
    return OptimizeResult(model=model, records=records, pipeline=parsed,
                          pipeline_text=format_pipeline(parsed), before=before, after=after, seed=seed,
                          input_shapes=shapes, cost_input_shapes=cost_shapes)


def load_model(model_or_path: Model | Any | str | os.PathLike, example_inputs: Any = None) -> Model:
    """A private Model from a path, a ModelProto, a Model (copied, so the caller's stays untouched) or a
    torch.nn.Module exported on `example_inputs`."""
    from irtool.frontends.torch import export_module, is_torch_module

    if isinstance(model_or_path, Model):
        return model_or_path.copy()
    if isinstance(model_or_path, (str, os.PathLike)):
        return Model.load(model_or_path)
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return Model.from_proto(model_or_path)
    if is_torch_module(model_or_path):
        if example_inputs is None:
            raise InputError(f"a PyTorch module ({type(model_or_path).__name__}) is exported first: "
                             "give example_inputs, the tensors its forward takes")
        proto = export_module(model_or_path, example_inputs)
        return Model.from_proto(proto, source=f"<torch {type(model_or_path).__name__}>", owned=True)
    raise InputError(f"expected a Model, an onnx.ModelProto, a path or a torch.nn.Module, "
                     f"got {type(model_or_path).__name__}")


def _check_print_ir_after(pipeline: Pipeline, names: Iterable[str]) -> None:
    # A misspelled name would otherwise print nothing and look like the pass never ran.
    present = {spec.name for spec in pipeline.passes}
    for name in names:
        if name not in present:
            raise PipelineError(f"--print-ir-after {name!r}: no such pass in the pipeline "
                                f"({', '.join(spec.name for spec in pipeline.passes)})")


def check_input_shapes(model: Model, shapes: Mapping[str, list[int]]) -> None:
    inputs = {t.name: t for t in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputError(f"--input-shape {name!r}: the model has no input of that name "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        declared = inputs[name].shape
        if declared is not None and len(declared) != len(dims):
            raise InputError(f"--input-shape {name!r}: {len(dims)} dims given, the input has {len(declared)}")
    symbol_sizes([(t.name, t.shape) for t in model.graph.inputs], shapes)  # one size per dim name, or an error
