"""The `irtool` command line: a thin click layer over irtool.api, irtool.report and the backends.

Only click and the standard library are imported at module level so `irtool --help` starts in a
fraction of a second; onnx, numpy and onnxruntime load inside the commands that need them.

Errors: `main` turns every failure into exactly one stderr line, `irtool: error: <message>`, and an
exit code: 2 for bad input or usage (InputError, PipelineError, BackendUnavailable, click usage
errors), 1 for everything else (PassError, VerificationError, PluginError, unexpected exceptions).
`--debug` prints the traceback first. Output files are written only after every pass succeeded,
each atomically, and never over the input model.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from irtool import __version__
from irtool.errors import InputError, IrtoolError, PipelineError

log = logging.getLogger("irtool.cli")


@dataclass
class _State:
    """Set by the group callback; read by `main` when an error comes back."""

    debug: bool = False


# ----------------------------------------------------------------------------------- group
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Print tracebacks of errors.")
@click.option("-v", "--verbose", count=True, help="Log to stderr: -v info, -vv debug.")
@click.version_option(__version__, "--version", prog_name="irtool")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """irtool: an ONNX model-optimization compiler."""
    state = ctx.ensure_object(_State)
    state.debug = debug
    _configure_logging(verbose)


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("irtool")
    logger.setLevel(level)
    if not any(getattr(h, "_irtool_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("irtool: %(levelname)s: %(message)s"))
        handler._irtool_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and map errors to one stderr line and an exit code."""
    state = _State()
    try:
        returned = cli.main(args=argv, prog_name="irtool", obj=state, standalone_mode=False)
    except click.Abort:
        return _fail("interrupted", 130, state)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        return _fail(e.format_message() + hint, 2, state)
    except click.ClickException as e:
        return _fail(e.format_message(), e.exit_code, state)
    except IrtoolError as e:
        return _fail(str(e), e.exit_code, state)
    except Exception as e:  # a bug in irtool or a dependency: still one line unless --debug
        message = f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)"
        return _fail(message, 1, state)
    return returned if isinstance(returned, int) else 0


def _fail(message: str, code: int, state: _State) -> int:
    if state.debug:
        traceback.print_exc()
    one_line = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"irtool: error: {one_line}", err=True)
    return code


# ----------------------------------------------------------------------------------- shared options
def _input_shape_option(func):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDx..",
                        help="Static shape for a model input, e.g. input:1x3x224x224 (repeatable).")(func)


def _json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def _calibration_options(func):
    options = [
        click.option("--calib-data", "calibration_data", metavar="PATH",
                     help="Calibration data: an .npz file (arrays keyed by input name, first axis = samples), a "
                          "folder of .npy/.npz files or images, file.py:NAME (a function returning {input: array} "
                          "dicts, or a list of them), or 'random' (explicitly, with a warning)."),
        click.option("--calib-samples", type=click.IntRange(min=1), metavar="N",
                     help="Use N samples, chosen with --seed (default: all)."),
        click.option("--calib-batch-size", type=click.IntRange(min=1), metavar="N",
                     help="Samples per calibration batch (default 16, fewer where a batch would keep over 1 GiB of "
                          "activations; a static batch dim in the model wins)."),
        click.option("--calib-preprocess", metavar="SPEC",
                     help="Image preprocessing: resize=256,crop=224,mean=0.485;0.456;0.406,"
                          "std=0.229;0.224;0.225,scale=1/255,layout=nchw|nhwc,order=rgb|bgr|gray; detectors: "
                          "letterbox=640,pad=114 instead of resize and crop."),
        click.option("--calib-cache", metavar="DIR", help="Folder for cached calibration statistics."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bars of calibration and sensitivity sweeps on stderr (default: when stderr "
                          "is a terminal)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_calibration_options(calib: dict[str, Any]) -> None:
    if calib["progress"] is None:
        calib["progress"] = sys.stderr.isatty()
    if calib["calibration_data"] is None:
        given = [f"--{k.replace('_', '-')}" for k in ("calib_samples", "calib_batch_size", "calib_preprocess")
                 if calib[k] is not None]
        if given:
            raise InputError(f"{', '.join(given)} need(s) --calib-data")
    cache = calib["calib_cache"]
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise InputError(f"--calib-cache {cache}: exists and is not a directory")


def _parse_shapes(texts: tuple[str, ...]) -> dict[str, list[int]]:
    from irtool.analysis.shapes import parse_input_shape

    shapes: dict[str, list[int]] = {}
    for text in texts:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise InputError(f"--input-shape {name!r} given twice")
        shapes[name] = dims
    return shapes


def _load(path: str):
    from irtool.ir.model import Model

    return Model.load(path)


def _echo_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, sort_keys=True, indent=2, allow_nan=False))


# ----------------------------------------------------------------------------------- opt
@cli.command()
@click.argument("model_in", metavar="IN")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="The optimized model file.")
@click.option("--passes", metavar="LIST", help="Comma-separated passes or named pipelines: cleanup,fold-bn.")
@click.option("--pipeline", "pipeline_text", metavar="TEXT", help="Pipeline text: 'prune{ratio=0.5}'.")
@click.option("--report", "report_path", metavar="FILE", help="Write the JSON report here.")
@click.option("--depfile", "depfile_path", metavar="FILE",
              help="Write the files this run read (model, external data, calibration data) as a Make/Ninja "
                   "depfile with OUT as its target.")
@click.option("--verify-each", is_flag=True, help="Verify the IR before the first and after every pass.")
@click.option("--print-ir-after", multiple=True, metavar="NAME", help="Print IR after pass NAME (stderr).")
@click.option("--dump-dir", metavar="DIR", help="Save the model after every pass as DIR/001_<pass>.onnx.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for passes that sample.")
@_input_shape_option
@_calibration_options
@_json_option
def opt(model_in: str, out: str, passes: str | None, pipeline_text: str | None, report_path: str | None,
        depfile_path: str | None, verify_each: bool, print_ir_after: tuple[str, ...], dump_dir: str | None,
        seed: int, input_shapes: tuple[str, ...], as_json: bool, **calib: Any) -> None:
    """Optimize IN with a pipeline and write OUT (and the report).

    Give exactly one of --passes (names only: cleanup,fold-bn) and --pipeline (text with options:
    'fold-bn,prune{ratio=0.5}'). `irtool passes` lists the passes, their options and named pipelines.
    OUT and the report are written only after every pass succeeded.
    """
    text = _pipeline_from_options(passes, pipeline_text)
    _hint_module_spec(model_in)
    _check_output_paths(Path(model_in), Path(out), Path(report_path) if report_path else None,
                        Path(depfile_path) if depfile_path else None)
    if dump_dir and Path(dump_dir).exists() and not Path(dump_dir).is_dir():
        raise InputError(f"--dump-dir {dump_dir}: exists and is not a directory")
    from irtool import report as rep
    from irtool.api import optimize

    _check_calibration_options(calib)
    result = optimize(model_in, text, seed=seed, input_shapes=_parse_shapes(input_shapes),
                      verify_each=verify_each, print_ir_after=print_ir_after, dump_dir=dump_dir,
                      ir_printer=lambda ir: click.echo(ir, err=True, nl=False), **calib)
    result.model.save(out)
    data = rep.build_report(result, model_in, out)
    if report_path:
        rep.write_report(data, report_path)
    if depfile_path:
        from irtool import depfile

        depfile.write(depfile_path, out, depfile.model_files(model_in)
                      + depfile.calibration_files(calib["calibration_data"]))
    click.echo(rep.to_json(data) if as_json else rep.format_text(data), nl=False)


def _hint_module_spec(model_in: str) -> None:
    """IN written like `irtool export`'s MODULE (file.py:NAME) names a PyTorch module, not an ONNX file."""
    from irtool.usercode import is_file_spec

    if is_file_spec(model_in) and not Path(model_in).exists():
        raise InputError(f"{model_in}: a PyTorch module, not an ONNX file; export it first: "
                         f"irtool export {model_in} -o model.onnx --input-shape NAME:DxD..")


def _pipeline_from_options(passes: str | None, pipeline_text: str | None) -> str:
    if (passes is None) == (pipeline_text is None):
        raise click.UsageError("give exactly one of --passes and --pipeline")
    if passes is not None and any(c in passes for c in "{}="):
        raise PipelineError(f"--passes {passes!r}: names only; options go in --pipeline: --pipeline '{passes}'")
    return passes if passes is not None else pipeline_text


def _check_output_paths(model_in: Path, out: Path, report: Path | None, depfile: Path | None = None) -> None:
    """Refuse before any work is done what would fail or destroy something at the end."""
    if out.resolve() == model_in.resolve():
        raise InputError(f"{out}: output is the input model; choose another output path")
    targets = [("output", out)] + [(what, path) for what, path in (("report", report), ("depfile", depfile))
                                   if path is not None]
    for what, path in targets:
        if path.is_dir():
            raise InputError(f"{path}: {what} path is a directory")
        if not path.resolve().parent.is_dir():
            raise InputError(f"{path.parent}: {what} folder does not exist")
    for what, path in targets[1:]:
        if path.resolve() in (out.resolve(), model_in.resolve()):
            raise InputError(f"{path}: the {what} would overwrite a model; choose another {what} path")
    if report is not None and depfile is not None and report.resolve() == depfile.resolve():
        raise InputError(f"{depfile}: the depfile would overwrite the report; choose another depfile path")


# ----------------------------------------------------------------------------------- export
@cli.command("export")
@click.argument("spec", metavar="MODULE")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="The ONNX file to write.")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="NAME:DxDx..",
              help="Name and shape of one of forward's inputs, e.g. x:1x3x224x224, or t:scalar for a 0-d tensor "
                   "(repeatable). Passed by name when every NAME is a parameter of forward (optional ones may be "
                   "left out), else in order.")
@click.option("--input-dtype", "input_dtypes", multiple=True, metavar="NAME:DTYPE",
              help="An input's dtype (default float32), e.g. input_ids:int64 (repeatable).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto: torch's dynamo exporter, the TorchScript tracer where torch.export fails.")
@click.option("--opset", type=click.IntRange(min=13), metavar="N", help="ONNX opset (default: the exporter's).")
@click.option("--static-batch", is_flag=True, help="Keep the example's batch size instead of a dynamic batch dim.")
@click.option("--dynamic", "dynamic_dims", multiple=True, metavar="NAME:AXIS=DIM",
              help="Another symbolic dim, e.g. input_ids:1=tokens; one DIM name ties dims together (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random example inputs.")
@click.option("--depfile", "depfile_path", metavar="FILE",
              help="Write the module's source files (the ones it imported from outside the Python installation) "
                   "as a Make/Ninja depfile with OUT as its target.")
def export(spec: str, out: str, input_shapes: tuple[str, ...], input_dtypes: tuple[str, ...], exporter: str,
           opset: int | None, static_batch: bool, dynamic_dims: tuple[str, ...], seed: int,
           depfile_path: str | None) -> None:
    """Export a PyTorch module to ONNX for `irtool opt`.

    MODULE is path/to/file.py:NAME or package.module:NAME; NAME is an nn.Module, or a class or function that
    returns one when called without arguments. The module is traced in eval mode on random inputs of the
    given shapes (zeros for integer dtypes); needs torch (pip install 'irtool[torch]').
    """
    from irtool.frontends.torch import (
        binds_by_name,
        example_inputs_for,
        export_module,
        load_module,
        missing_parameters,
    )
    from irtool.ir.model import Model

    shapes, dtypes, dynamic = _parse_shapes(input_shapes), _parse_dtypes(input_dtypes), _parse_dynamic(dynamic_dims)
    unknown = sorted(set(dtypes) - set(shapes))
    if unknown:
        raise InputError(f"--input-dtype {unknown[0]!r}: no --input-shape of that name")
    _check_output_paths(Path(spec.rpartition(":")[0] or spec), Path(out), None,
                        Path(depfile_path) if depfile_path else None)
    imported_before = set(sys.modules)
    module = load_module(spec)
    arrays = example_inputs_for(shapes, dtypes, seed)
    # By name where forward declares every name: a wrong order would otherwise swap inputs without an error.
    by_name = binds_by_name(module, list(shapes))
    missing = missing_parameters(module, list(shapes)) if by_name else []
    if missing:
        raise InputError(f"{type(module).__name__}.forward needs {missing[0]!r}, which has no default: give "
                         f"--input-shape {missing[0]}:DxD..")
    proto = export_module(module, dict(zip(shapes, arrays, strict=True)) if by_name else arrays,
                          input_names=None if by_name else list(shapes), dynamic_batch=not static_batch,
                          dynamic_axes=dynamic, exporter=exporter, opset=opset)
    model = Model.from_proto(proto, source=spec, owned=True)
    model.save(out)
    if depfile_path:
        from irtool import depfile
        from irtool.usercode import is_file_spec

        sources = [spec.rpartition(":")[0]] if is_file_spec(spec) else []
        depfile.write(depfile_path, out, sources + depfile.imported_files(imported_before))
    inputs = ", ".join(f"{t.name}: {list(t.shape or [])}" for t in model.graph.inputs)
    click.echo(f"{out}: {type(module).__name__} exported (opset {model.opset}, "
               f"{len(model.graph.nodes)} nodes; inputs {inputs})")


def _parse_dynamic(texts: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for text in texts:
        name, _, rest = text.rpartition(":")
        axis, sep, dim = rest.partition("=")
        if not name or not sep or not axis.lstrip("-").isdigit():
            raise InputError(f"--dynamic {text!r}: expected NAME:AXIS=DIM, e.g. input_ids:1=tokens")
        axes.setdefault(name, {})[int(axis)] = dim
    return axes


def _parse_dtypes(texts: tuple[str, ...]) -> dict[str, str]:
    import numpy as np

    dtypes: dict[str, str] = {}
    for text in texts:
        name, sep, kind = text.rpartition(":")
        try:
            valid = bool(sep and name) and np.dtype(kind).kind in "fiub"
        except TypeError:
            valid = False
        if not valid:
            raise InputError(f"--input-dtype {text!r}: expected NAME:DTYPE with a numeric dtype, e.g. ids:int64")
        dtypes[name] = kind
    return dtypes


# ----------------------------------------------------------------------------------- passes
@cli.command("passes")
@_json_option
def passes_cmd(as_json: bool) -> None:
    """List every registered pass with its options, and the named pipelines."""
    from irtool.describe import describe_registry, format_registry

    data = describe_registry()
    if as_json:
        _echo_json(data)
    else:
        click.echo(format_registry(data), nl=False)


# ----------------------------------------------------------------------------------- inspect / show / verify
@cli.command()
@click.argument("model_path", metavar="MODEL")
@_input_shape_option
@click.option("--channel-groups", "channel_groups", is_flag=True,
              help="Also list coupled channel groups for pruning, with the reason each locked one is locked.")
@_json_option
def inspect(model_path: str, input_shapes: tuple[str, ...], channel_groups: bool, as_json: bool) -> None:
    """Op histogram, parameters, MACs, memory, inputs and outputs of MODEL."""
    from irtool.describe import describe_channel_groups, describe_model, format_channel_groups, format_model_summary

    model, shapes = _load(model_path), _parse_shapes(input_shapes)
    data = describe_model(model, shapes)
    data["model"] = model_path
    if channel_groups:
        data["channel_groups"] = describe_channel_groups(model, shapes)
    if as_json:
        _echo_json(data)
        return
    click.echo(format_model_summary(data), nl=False)
    if channel_groups:
        click.echo(format_channel_groups(data["channel_groups"]), nl=False)


@cli.command()
@click.argument("model_path", metavar="MODEL")
@_input_shape_option
def show(model_path: str, input_shapes: tuple[str, ...]) -> None:
    """Print MODEL as textual IR."""
    from irtool.api import check_input_shapes
    from irtool.ir.printer import format_model

    model = _load(model_path)
    shapes = _parse_shapes(input_shapes)
    check_input_shapes(model, shapes)
    click.echo(format_model(model, shapes or None), nl=False)


@cli.command()
@click.argument("model_path", metavar="MODEL")
def verify(model_path: str) -> None:
    """Check MODEL's IR invariants, onnx.checker and shape inference; exit 1 if it is not sound."""
    from irtool.ir.verify import verify as verify_model

    model = _load(model_path)
    verify_model(model)
    upgraded = f", checked upgraded to {model.opset}" if model.source_opset != model.opset else ""
    click.echo(f"{model_path}: ok ({sum(1 for _ in model.nodes())} nodes, opset {model.source_opset}{upgraded})")


# ----------------------------------------------------------------------------------- sensitivity
@cli.command()
@click.argument("model_path", metavar="MODEL")
@click.option("--profile", type=click.Choice(["ort-cpu", "trt"]), default="ort-cpu", show_default=True,
              help="Q/DQ placement profile.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="Calibration method.")
@click.option("--plot", "plot_path", metavar="PNG", help="Also write a bar chart (needs matplotlib).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sample selection.")
@_calibration_options
@_input_shape_option
@_json_option
def sensitivity(model_path: str, profile: str, method: str, plot_path: str | None, seed: int,
                input_shapes: tuple[str, ...], as_json: bool, **calib: Any) -> None:
    """Rank MODEL's layers by how much quantizing each one alone costs in output SQNR."""
    from irtool.passes.quant.sensitivity import report_for_path

    _check_calibration_options(calib)
    if calib["calibration_data"] is None:
        raise InputError("sensitivity needs --calib-data (a path, or 'random')")
    report = report_for_path(model_path, profile=profile, method=method, seed=seed,
                             input_shapes=_parse_shapes(input_shapes), **calib)
    if plot_path:
        report.plot(plot_path)
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(report.to_text(), nl=False)


# ----------------------------------------------------------------------------------- compare / bench
@cli.command()
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True, help="Input sets.")
@_input_shape_option
@_json_option
def compare(model_a: str, model_b: str, seed: int, samples: int, input_shapes: tuple[str, ...],
            as_json: bool) -> None:
    """Run A and B on the same random inputs with ONNX Runtime and compare their outputs."""
    from irtool.backends import ort
    from irtool.describe import format_compare

    shapes = _parse_shapes(input_shapes)
    result = ort.compare(_load(model_a), _load(model_b), seed=seed, samples=samples,
                         input_shapes=shapes or None)
    data = result.to_dict()
    if as_json:
        _echo_json(data)
    else:
        click.echo(format_compare(data, model_a, model_b), nl=False)
    if not result.ok:
        # Scripts gate on the exit code; the numbers above say by how much.
        raise IrtoolError(f"outputs differ beyond atol={result.atol}, rtol={result.rtol} (worst: {result.worst})")


@cli.command()
@click.argument("model_path", metavar="MODEL")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Intra-op threads.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@_input_shape_option
@_json_option
def bench(model_path: str, threads: int, runs: int, warmup: int, seed: int, input_shapes: tuple[str, ...],
          as_json: bool) -> None:
    """Time MODEL with ONNX Runtime on random inputs."""
    from irtool.backends import ort
    from irtool.describe import format_mapping

    model = _load(model_path)
    feeds = ort.make_inputs(model, seed=seed, input_shapes=_parse_shapes(input_shapes) or None)
    data = ort.benchmark(model, feeds=feeds, warmup=warmup, runs=runs, threads=threads, seed=seed).to_dict()
    if as_json:
        _echo_json(data)
    else:
        click.echo(f"bench {model_path}")
        click.echo(format_mapping(data), nl=False)


# ----------------------------------------------------------------------------------- TensorRT
def _shapes_option(func):
    return click.option("--shapes", "shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
                        help="TensorRT optimization profile for an input, each shape DxDxD, e.g. "
                             "x:1x3x224x224,8x3x224x224,16x3x224x224 (one shape = fixed; repeatable).")(func)


@cli.command("trt-check")
@click.argument("model_path", metavar="MODEL")
@_shapes_option
@click.option("--fp16", is_flag=True, help="Also report FP16 range and precision risks.")
@click.option("--int8", is_flag=True, help="Require explicit Q/DQ for INT8.")
@_json_option
def trt_check(model_path: str, shapes: tuple[str, ...], fp16: bool, int8: bool, as_json: bool) -> None:
    """Check whether TensorRT's ONNX parser can take MODEL (pure Python: no TensorRT or GPU needed).

    Exits 1 when an error finding says the build would fail.
    """
    from irtool.backends.trt_readiness import check_trt_readiness, format_readiness, parse_shape_profiles

    result = check_trt_readiness(model_path, shapes=parse_shape_profiles(shapes), fp16=fp16, int8=int8)
    if as_json:
        _echo_json({"model": model_path, **result.to_dict()})
    else:
        click.echo(format_readiness(result, model_path), nl=False)
    if not result.ready:
        raise IrtoolError(f"{model_path} is not TensorRT-ready: {result.counts()['error']} error finding(s)")


@cli.command("build-engine")
@click.argument("model_path", metavar="MODEL")
@click.option("-o", "--output", "out", required=True, metavar="ENGINE", help="The serialized engine (.plan).")
@click.option("--fp16", is_flag=True, help="FP16 kernels (TensorRT 11: the model must already be float16).")
@click.option("--int8", is_flag=True, help="INT8 from the model's explicit Q/DQ (insert-qdq{profile=trt}).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), default=1024, show_default=True,
              metavar="MB", help="Builder workspace memory limit.")
@click.option("--strongly-typed", is_flag=True, help="Strongly typed network (always on in TensorRT 11).")
@click.option("--timing-cache", metavar="PATH", help="Timing cache to read (if present) and update.")
@_shapes_option
def build_engine(model_path: str, out: str, fp16: bool, int8: bool, workspace_mb: int, strongly_typed: bool,
                 timing_cache: str | None, shapes: tuple[str, ...]) -> None:
    """Build a TensorRT engine for MODEL and write it to ENGINE (needs TensorRT and an NVIDIA GPU)."""
    _check_output_paths(Path(model_path), Path(out), None)
    from irtool.backends.tensorrt import build_engine as build
    from irtool.backends.trt_readiness import parse_shape_profiles

    path = build(model_path, out, fp16=fp16, int8=int8, workspace_mb=workspace_mb, strongly_typed=strongly_typed,
                 shapes=parse_shape_profiles(shapes), timing_cache=timing_cache)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
