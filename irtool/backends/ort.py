"""ONNX Runtime backend, the embedded default: run, generate inputs, benchmark, compare two models.

The Runner protocol follows Polygraphy's loaders/runners: construction is cheap and only remembers
the model; `build()` creates the session (once, lazily, also on first `infer`); `infer(feeds)`
returns the outputs by name; `close()` releases the session. Runners are context managers.

Session creation accepts an irtool `Model`, an `onnx.ModelProto` or a path (loaded through the safe
loader, so a path gets the same checks as `irtool.ir.load`). Two frictions are handled here:

- onnx may stamp an IR version newer than the installed onnxruntime reads (onnx 1.23 writes 14,
  onnxruntime 1.31 stops at 13). The session gets the model with its IR version lowered to what this
  onnxruntime accepts; the caller's model is not changed.
- protobuf cannot serialize 2 GB or more. Such models are written with external data into a
  temporary folder (kept until `close()`) and the session is created from that path; smaller models
  go to onnxruntime as serialized bytes.

Errors from onnxruntime become one-line `InputError` (bad model, wrong feed names, shapes or dtypes)
or `IrtoolError` (a failure while running), with the original exception chained.

Comparison metrics (`compare`), with `a` the reference output and `b` the candidate, over all samples:
    max_abs = max|a−b|        max_rel = max(|a−b| / max(|a|, 1e-12))
    sqnr_db = 10·log10(Σa² / Σ(a−b)²)   (inf when identical)
    cosine  = Σab / √(Σa²·Σb²)          top1_agreement = mean(argmax_last(a) == argmax_last(b)), ndim ≥ 2
An output is ok when its shapes match and every element satisfies |a−b| ≤ atol + rtol·|a| (numpy's
allclose rule); the worst output is the one with the lowest SQNR.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from irtool.errors import InputError, IrtoolError
from irtool.ir import io
from irtool.ir.model import Model
from irtool.ir.skeleton import symbol_sizes

log = logging.getLogger(__name__)

ModelLike = Model | onnx.ModelProto | str | os.PathLike
Feeds = dict[str, np.ndarray]

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# Random integer inputs are 0 or 1: valid indices into any table of two rows or more, and valid attention-mask
# values (with 2 or 3, a BERT-style padding bias (1 - mask) * finfo(float32).min overflows to inf).
INT_INPUT_HIGH = 2


# ----------------------------------------------------------------------------------------- model access
def as_proto(model: ModelLike) -> onnx.ModelProto:
    """A ModelProto for any accepted model form; paths go through the safe loader."""
    if isinstance(model, Model):
        return model.to_proto()
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return io.read_model_proto(model)
    raise TypeError(f"expected a Model, ModelProto or path, got {type(model).__name__}")


def graph_inputs(proto: onnx.ModelProto) -> list[tuple[str, np.dtype | None, list[int | str | None] | None]]:
    """(name, dtype, dims) of real inputs; dims hold ints, symbolic names or None; None for unknown rank."""
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else None
        dims = None
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        specs.append((info.name, dtype, dims))
    return specs


def output_names(proto: onnx.ModelProto) -> list[str]:
    return [o.name for o in proto.graph.output]


# ----------------------------------------------------------------------------------------- errors
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"^\S+:\d+ [^\s(]+\(.*?\) ")


def ort_message(e: BaseException) -> str:
    """onnxruntime's message on one line, without the error-code prefix and C++ source location."""
    text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", str(e).strip()))
    return " ".join(text.split())[:300] or type(e).__name__


@functools.cache
def ort_max_ir_version() -> int:
    """The highest model IR version this onnxruntime loads, found by asking it once."""
    import onnxruntime as ort

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=onnx.IR_VERSION)
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return onnx.IR_VERSION
    except Exception as e:  # onnxruntime's exceptions derive from Exception only
        found = re.search(r"max supported IR version: (\d+)", str(e))
        if not found:
            raise IrtoolError(f"onnxruntime cannot load a minimal model: {ort_message(e)}") from e
        return int(found.group(1))


# ----------------------------------------------------------------------------------------- runner
def _session_options(threads: int | None, optimization_level: str, optimized_model_path: str | None):
    import onnxruntime as ort

    if optimization_level not in _OPT_LEVELS:
        raise InputError(f"optimization level {optimization_level!r} is not one of {sorted(_OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization_level])
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def _needs_external_data(proto: onnx.ModelProto) -> bool:
    # protobuf refuses messages of 2 GiB or more (and upb's ByteSize() would serialize to find out).
    return io.tensor_bytes(proto) >= io.EXTERNAL_DATA_THRESHOLD


class OrtRunner:
    """Run a model with ONNX Runtime: build() once, infer() many times, close()."""

    def __init__(self, model: ModelLike, threads: int | None = None,
                 providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
                 optimization_level: str = "all", optimized_model_path: str | None = None):
        self.model = model
        self.threads = threads
        self.providers = list(providers)
        self.optimization_level = optimization_level
        self.optimized_model_path = optimized_model_path
        self._session = None
        self._tmp_dir: Path | None = None

    @property
    def name(self) -> str:
        return "onnxruntime"

    def build(self) -> OrtRunner:
        """Create the session (idempotent)."""
        if self._session is not None:
            return self
        options = _session_options(self.threads, self.optimization_level, self.optimized_model_path)
        proto = as_proto(self.model)
        original_ir = proto.ir_version
        proto.ir_version = min(original_ir, ort_max_ir_version())
        try:
            self._session = self._create_session(proto, options)
        finally:
            proto.ir_version = original_ir
        return self

    def _create_session(self, proto: onnx.ModelProto, options):
        import onnxruntime as ort

        if _needs_external_data(proto):
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="irtool-ort-"))
            path = self._tmp_dir / "model.onnx"
            io.write_model_proto(proto, path, external_data=True)
            source: str | bytes = str(path)
        else:
            source = proto.SerializeToString()
        try:
            return ort.InferenceSession(source, sess_options=options, providers=self.providers)
        except Exception as e:  # onnxruntime raises Fail/InvalidGraph/... which derive from Exception only
            self._remove_tmp()
            raise InputError(f"onnxruntime cannot load the model: {ort_message(e)}") from e

    def input_specs(self) -> list[tuple[str, np.dtype | None, list[int | None]]]:
        """(name, numpy dtype, shape with None for symbolic dims) of each session input."""
        self.build()
        return [(i.name, _ort_dtype(i.type), [d if isinstance(d, int) else None for d in i.shape])
                for i in self._session.get_inputs()]

    def output_names(self) -> list[str]:
        self.build()
        return [o.name for o in self._session.get_outputs()]

    def infer(self, feeds: Feeds) -> Feeds:
        """Run once; returns {output name: array} in the model's output order."""
        self.build()
        self._check_feed_names(feeds)
        names = self.output_names()
        try:
            values = self._session.run(names, {k: np.asarray(v) for k, v in feeds.items()})
        except Exception as e:
            kind = type(e).__name__
            if kind in ("InvalidArgument", "ValueError", "TypeError"):
                raise InputError(f"onnxruntime rejects the inputs: {ort_message(e)}") from e
            raise IrtoolError(f"onnxruntime failed while running the model: {ort_message(e)}") from e
        return dict(zip(names, values, strict=True))

    def _check_feed_names(self, feeds: Feeds) -> None:
        expected = [i.name for i in self._session.get_inputs()]
        missing = [n for n in expected if n not in feeds]
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            raise InputError(f"feeds do not match the model inputs {expected}: "
                             f"missing {missing}, unknown {unknown}")

    def close(self) -> None:
        self._session = None
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> OrtRunner:
        return self.build()

    def __exit__(self, *exc: Any) -> None:
        self.close()


_ORT_TYPES = {
    "float": np.float32, "float16": np.float16, "double": np.float64, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "string": np.str_,
}


def _ort_dtype(type_text: str) -> np.dtype | None:
    inner = type_text[len("tensor("):-1] if type_text.startswith("tensor(") else type_text
    kind = _ORT_TYPES.get(inner)
    return None if kind is None else np.dtype(kind)


def run(model: ModelLike, feeds: Feeds, threads: int | None = None) -> Feeds:
    """Run `model` once on `feeds` and return its outputs by name."""
    with OrtRunner(model, threads=threads) as runner:
        return runner.infer(feeds)


# ----------------------------------------------------------------------------------------- inputs
def make_inputs(model: ModelLike, seed: int = 0, input_shapes: dict[str, list[int]] | None = None,
                batch: int | None = None, strict: bool = False) -> Feeds:
    """Deterministic random inputs: floats ~N(0,1), integers in [0, INT_INPUT_HIGH), bools fair coins.

    Symbolic dims come from `input_shapes` (whole shapes by input name); otherwise a symbolic first
    dim becomes `batch` when given, and any other symbolic dim 1 -- or an InputError when `strict`.
    """
    proto = as_proto(model)
    specs = graph_inputs(proto)
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - {name for name, _, _ in specs})
    if unknown:
        raise InputError(f"input shapes name {unknown}, which are not model inputs "
                         f"({', '.join(name for name, _, _ in specs)})")
    rng = np.random.default_rng(seed)
    sizes = symbol_sizes([(name, dims) for name, _, dims in specs], shapes)
    feeds: Feeds = {}
    for name, dtype, dims in specs:
        resolved = _resolve_dims(name, dims, shapes.get(name), batch, strict, sizes)
        feeds[name] = _random_array(rng, name, dtype, resolved)
    return feeds


def _resolve_dims(name: str, dims, given: list[int] | None, batch: int | None, strict: bool,
                  sizes: dict[str, int]) -> list[int]:
    if given is not None:
        if dims is not None and len(dims) != len(given):
            raise InputError(f"input {name!r}: shape {given} has rank {len(given)}, the model's has {len(dims)}")
        for i, (old, new) in enumerate(zip(dims or [], given, strict=False)):
            if isinstance(old, int) and old > 0 and old != new:
                raise InputError(f"input {name!r}: dim {i} is fixed to {old} in the model, got {new}")
        return list(given)
    if dims is None:
        raise InputError(f"input {name!r} has no shape in the model; give its shape (--input-shape {name}:DxD)")
    resolved = []
    for i, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            resolved.append(dim)
        elif dim in sizes:  # a name another input's given shape fixes
            resolved.append(sizes[dim])
        elif i == 0 and batch is not None:
            resolved.append(batch)
        elif strict:
            raise InputError(f"input {name!r}: dim {i} ({dim or '?'}) is symbolic; "
                             f"give its shape (--input-shape {name}:DxD)")
        else:
            resolved.append(1)
    return resolved


def _random_array(rng: np.random.Generator, name: str, dtype: np.dtype | None, dims: list[int]) -> np.ndarray:
    if dtype is None or dtype.kind in "OSU":
        raise InputError(f"input {name!r}: cannot generate random data of type {dtype}")
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.random(dims) < 0.5
    return rng.integers(0, INT_INPUT_HIGH, size=dims).astype(dtype)


# ----------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchResult:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(model: ModelLike, feeds: Feeds | None = None, warmup: int = 5, runs: int = 50,
              threads: int | None = 1, seed: int = 0) -> BenchResult:
    """Latency of one inference in milliseconds over `runs` timed runs after `warmup` untimed ones."""
    if runs < 1 or warmup < 0:
        raise InputError(f"benchmark needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    proto = as_proto(model)
    feeds = feeds if feeds is not None else make_inputs(proto, seed=seed)
    with OrtRunner(proto, threads=threads) as runner:
        for _ in range(warmup):
            runner.infer(feeds)
        times = np.empty(runs)
        for i in range(runs):
            started = time.perf_counter()
            runner.infer(feeds)
            times[i] = (time.perf_counter() - started) * 1e3
    return BenchResult(median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)),
                       mean_ms=float(times.mean()), min_ms=float(times.min()), runs=runs, threads=threads)


# ----------------------------------------------------------------------------------------- compare
@dataclass
class OutputDiff:
    name: str
    shape_a: list[int]
    shape_b: list[int]
    max_abs: float | None
    max_rel: float | None
    sqnr_db: float | None
    cosine: float | None
    top1_agreement: float | None
    ok: bool

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}


@dataclass
class CompareResult:
    outputs: dict[str, OutputDiff]
    ok: bool
    worst: str | None
    samples: int
    atol: float
    rtol: float

    def to_dict(self) -> dict:
        """JSON-ready; infinite SQNR is written as the string "inf"."""
        return {"ok": self.ok, "worst": self.worst, "samples": self.samples, "atol": self.atol,
                "rtol": self.rtol, "outputs": {n: d.to_dict() for n, d in self.outputs.items()}}


def _json_float(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclass
class _Accumulator:
    """Running sums for one output across samples."""

    shape_a: list[int] = field(default_factory=list)
    shape_b: list[int] = field(default_factory=list)
    same_shape: bool = True
    max_abs: float = 0.0
    max_rel: float = 0.0
    ref2: float = 0.0
    err2: float = 0.0
    cand2: float = 0.0
    dot: float = 0.0
    top1_hits: int = 0
    top1_rows: int = 0
    close: bool = True

    def add(self, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> None:
        self.shape_a, self.shape_b = list(a.shape), list(b.shape)
        if a.shape != b.shape:
            self.same_shape = False
            return
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        diff = np.abs(a64 - b64)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(a64), 1e-12)).max()))
        self.ref2 += float(a64 @ a64)
        self.err2 += float(diff @ diff)
        self.cand2 += float(b64 @ b64)
        self.dot += float(a64 @ b64)
        self.close = self.close and bool(np.all(diff <= atol + rtol * np.abs(a64)))
        if a.ndim >= 2 and a.shape[-1] > 0:
            self.top1_hits += int((a.argmax(axis=-1) == b.argmax(axis=-1)).sum())
            self.top1_rows += a.size // a.shape[-1]

    def result(self, name: str) -> OutputDiff:
        if not self.same_shape:
            return OutputDiff(name, self.shape_a, self.shape_b, None, None, None, None, None, ok=False)
        return OutputDiff(name, self.shape_a, self.shape_b, self.max_abs, self.max_rel, self._sqnr(),
                          self._cosine(), self.top1_hits / self.top1_rows if self.top1_rows else None,
                          ok=self.close)

    def _sqnr(self) -> float:
        if self.err2 == 0.0:
            return math.inf
        if self.ref2 == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref2 / self.err2)

    def _cosine(self) -> float:
        if self.ref2 == 0.0 and self.cand2 == 0.0:
            return 1.0
        if self.ref2 == 0.0 or self.cand2 == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.ref2 * self.cand2)


def compare(model_a: ModelLike, model_b: ModelLike, feeds: Feeds | None = None, seed: int = 0,
            samples: int = 1, input_shapes: dict[str, list[int]] | None = None,
            atol: float = 1e-4, rtol: float = 1e-3) -> CompareResult:
    """Run both models on the same inputs (model_a is the reference) and measure how outputs differ.

    With `feeds` given they are the only sample; otherwise `samples` random input sets are drawn from
    seeds seed, seed+1, ... Feeds are cast to model_b's input dtypes where they differ (e.g. fp16 I/O).
    """
    proto_a, proto_b = as_proto(model_a), as_proto(model_b)
    _check_same_interface(proto_a, proto_b)
    dtypes_b = {name: dtype for name, dtype, _ in graph_inputs(proto_b)}
    samples_feeds = [feeds] if feeds is not None else \
        [make_inputs(proto_a, seed=seed + i, input_shapes=input_shapes) for i in range(samples)]
    accumulators = {name: _Accumulator() for name in output_names(proto_a)}
    with OrtRunner(proto_a) as runner_a, OrtRunner(proto_b) as runner_b:
        for sample in samples_feeds:
            out_a = runner_a.infer(sample)
            out_b = runner_b.infer(_cast_feeds(sample, dtypes_b))
            for name, acc in accumulators.items():
                acc.add(np.asarray(out_a[name]), np.asarray(out_b[name]), atol, rtol)
    diffs = {name: acc.result(name) for name, acc in accumulators.items()}
    return CompareResult(outputs=diffs, ok=all(d.ok for d in diffs.values()), worst=_worst(diffs),
                         samples=len(samples_feeds), atol=atol, rtol=rtol)


def _check_same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    for what, names_a, names_b in (("inputs", [n for n, _, _ in graph_inputs(a)], [n for n, _, _ in graph_inputs(b)]),
                                   ("outputs", output_names(a), output_names(b))):
        if set(names_a) != set(names_b):
            raise InputError(f"the models' {what} differ: only in the first {sorted(set(names_a) - set(names_b))}, "
                             f"only in the second {sorted(set(names_b) - set(names_a))}")


def _cast_feeds(feeds: Feeds, dtypes: dict[str, np.dtype | None]) -> Feeds:
    return {k: (v.astype(dtypes[k]) if dtypes.get(k) is not None and v.dtype != dtypes[k] else v)
            for k, v in feeds.items()}


def _worst(diffs: dict[str, OutputDiff]) -> str | None:
    def badness(d: OutputDiff) -> float:
        return -math.inf if d.sqnr_db is None else d.sqnr_db
    return min(diffs.values(), key=badness).name if diffs else None
