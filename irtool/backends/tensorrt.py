"""TensorRT backend: build a serialized engine from ONNX, save/load it, and run it on numpy inputs.

`tensorrt` is imported here only, lazily (inside `_import_tensorrt`), so `import irtool` and this
module work without TensorRT or a GPU; a missing TensorRT raises BackendUnavailable with the install
hint, a machine without a usable CUDA device raises BackendUnavailable naming the CUDA error.

The runner follows the ORT runner's protocol (Polygraphy's loaders/runners): construction only
remembers the model and options; `build()` parses, builds and deserializes the engine (once);
`infer(feeds)` returns outputs by name; `close()` releases device objects; runners are context
managers. `build_plan()` builds only the serialized engine (no execution context and no cuda-python
needed), which is what `irtool build-engine` uses.

Build steps (TensorRT 10.x / 11.x Python API):
    builder = trt.Builder(logger); network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger); parser.parse(bytes, path) / parse_from_file(path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max)
    config.create_timing_cache(bytes) / set_timing_cache / get_timing_cache().serialize()
    plan = builder.build_serialized_network(network, config)
Run steps: trt.Runtime(logger).deserialize_cuda_engine(plan); engine.create_execution_context();
context.set_input_shape / set_tensor_address / execute_async_v3(stream); device memory through
cuda-python's runtime API (cuda.bindings.runtime, or the older cuda.cudart).

Version differences, decided by `trt_features` from `trt.__version__` and the enums present:
- 10.x: networks are explicit-batch always (EXPLICIT_BATCH is ignored, so it is never passed);
  strongly typed networks are opt-in through NetworkDefinitionCreationFlag.STRONGLY_TYPED. Weakly
  typed networks take precision from BuilderFlag.FP16 / INT8; a network with Q/DQ gets the INT8 flag
  (explicit quantization). Strongly typed networks forbid those flags: precision comes from the model.
- 11.x: every network is strongly typed (the flag is deprecated and ignored) and BuilderFlag.FP16 /
  INT8 and calibrators are gone. fp16 therefore needs a model already converted to float16 (the
  `fp16` pass), and int8 needs explicit Q/DQ (`insert-qdq{profile=trt}`).
On both, int8 without Q/DQ in the model is refused: irtool never uses implicit calibration.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from irtool.backends.trt_readiness import INT8_NEEDS_QDQ, ShapeProfile, has_float16, has_qdq
from irtool.errors import BackendUnavailable, InputError, IrtoolError

log = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)"
CUDA_PYTHON_HINT = "running TensorRT engines needs cuda-python: pip install cuda-python"
DEFAULT_WORKSPACE_MB = 1024
_MAX_PARSER_ERRORS = 5


# ----------------------------------------------------------------------------------------- lazy imports
def _import_tensorrt():
    """The tensorrt module, or BackendUnavailable with the install hint."""
    try:
        import tensorrt as trt  # noqa: TID251 -- the one place tensorrt is imported
    except ImportError as e:
        raise BackendUnavailable(INSTALL_HINT) from e
    except OSError as e:  # the wheel is there but libnvinfer / libcuda cannot be loaded
        raise BackendUnavailable(f"TensorRT is installed but cannot load its libraries ({e}); "
                                 "it needs an NVIDIA GPU and driver") from e
    return trt


def _import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since cuda-python 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendUnavailable(CUDA_PYTHON_HINT) from e
    return cudart


# ----------------------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class TrtFeatures:
    """What the installed TensorRT offers, from its version and the enums it actually has."""

    version: str
    major: int
    fp16_flag: bool          # BuilderFlag.FP16 exists (removed in 11)
    int8_flag: bool          # BuilderFlag.INT8 exists (removed in 11)
    always_strongly_typed: bool  # 11+: every network is strongly typed


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}") from None


def trt_features(trt) -> TrtFeatures:
    version = str(getattr(trt, "__version__", "0"))
    major = trt_major(version)
    if major < 10:
        raise BackendUnavailable(f"TensorRT {version} is too old: irtool needs TensorRT 10 or newer "
                                 "(pip install 'tensorrt>=10')")
    flags = trt.BuilderFlag
    return TrtFeatures(version=version, major=major, fp16_flag=hasattr(flags, "FP16"),
                       int8_flag=hasattr(flags, "INT8"), always_strongly_typed=major >= 11)


def network_flags(trt, features: TrtFeatures, strongly_typed: bool) -> int:
    """create_network flags: STRONGLY_TYPED on request for 10.x; 0 on 11+ (always strongly typed)."""
    if strongly_typed and not features.always_strongly_typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def precision_flags(features: TrtFeatures, *, fp16: bool, int8: bool, strongly_typed: bool,
                    model_has_qdq: bool, model_has_fp16: bool) -> list[str]:
    """Names of the BuilderFlags to set, or an InputError saying what to do to the model instead."""
    if int8 and not model_has_qdq:
        raise InputError(INT8_NEEDS_QDQ)
    strong = strongly_typed or features.always_strongly_typed
    if strong:
        if fp16 and not model_has_fp16:
            where = (f"TensorRT {features.version} removed BuilderFlag.FP16" if features.always_strongly_typed
                     else "strongly typed networks take precision from the model")
            raise InputError(f"--fp16: {where}; convert the model to float16 first "
                             "(irtool opt MODEL -o OUT --passes fp16), then build it")
        return []
    names = []
    if fp16 and features.fp16_flag:
        names.append("FP16")
    if model_has_qdq and features.int8_flag:  # explicit quantization in a weakly typed 10.x network
        names.append("INT8")
    return names


# ----------------------------------------------------------------------------------------- logging
def _make_logger(trt):
    """A trt.ILogger that forwards to Python logging and keeps the last errors for exception messages."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=3)

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
                log.error("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("tensorrt: %s", msg)
            else:
                log.debug("tensorrt: %s", msg)

        def last_errors(self) -> str:
            return " | ".join(self.errors) or "no error logged (run with -vv for TensorRT's log)"

    return _Logger()


# ----------------------------------------------------------------------------------------- model source
@dataclass
class _Source:
    """What the parser reads (bytes, or a file for models with external data) and the proto to check."""

    proto: onnx.ModelProto
    data: bytes | None = None
    path: str | None = None


def _model_source(model, tmp_dir_factory) -> _Source:
    from irtool.backends.ort import as_proto
    from irtool.ir import io
    from irtool.ir.model import Model

    if isinstance(model, (bytes, bytearray)):
        return _Source(io.parse_model_bytes(bytes(model)), data=bytes(model))
    if isinstance(model, (str, os.PathLike)):
        return _Source(io.read_model_proto(model), path=str(Path(model).resolve()))
    if isinstance(model, (Model, onnx.ModelProto)):
        proto = as_proto(model)
        if io.tensor_bytes(proto) >= io.EXTERNAL_DATA_THRESHOLD:
            path = tmp_dir_factory() / "model.onnx"
            io.write_model_proto(proto, path, external_data=True)
            return _Source(proto, path=str(path))
        return _Source(proto, data=proto.SerializeToString())
    raise TypeError(f"expected a Model, ModelProto, bytes or path, got {type(model).__name__}")


def _parser_error_text(error, proto: onnx.ModelProto) -> str:
    """One parser error as `node 'conv1' (Conv): message`, using the node name TensorRT reports or the index."""
    desc = " ".join(str(error.desc()).split())
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    index = error.node()
    if not name and 0 <= index < len(proto.graph.node):
        name, op = proto.graph.node[index].name or f"#{index}", proto.graph.node[index].op_type
    return f"node '{name}' ({op}): {desc}" if name else desc


def _check_profile_fits(name: str, dims: tuple[int, ...], profile: ShapeProfile) -> None:
    from irtool.backends.trt_readiness import profile_problems

    problems = profile_problems([d if d >= 0 else None for d in dims], profile)
    if problems:
        raise InputError(f"--shapes {name}:{profile}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------- runner
class TrtRunner:
    """Build a TensorRT engine for a model and run it: build() once, infer() many times, close()."""

    def __init__(self, model, *, fp16: bool = False, int8: bool = False, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 shapes: dict[str, ShapeProfile | tuple] | None = None, timing_cache: str | os.PathLike | None = None,
                 strongly_typed: bool = False):
        if workspace_mb < 1:
            raise InputError(f"workspace must be at least 1 MB, got {workspace_mb}")
        self.model = model
        self.fp16 = fp16
        self.int8 = int8
        self.workspace_mb = workspace_mb
        self.shapes = {name: p if isinstance(p, ShapeProfile) else ShapeProfile(*map(tuple, p))
                       for name, p in (shapes or {}).items()}
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.strongly_typed = strongly_typed
        self._plan: bytes | None = None
        self._logger = None
        self._runtime = None
        self._engine = None
        self._context = None
        self._stream = None
        self._tmp_dir: Path | None = None

    @property
    def name(self) -> str:
        return "tensorrt"

    @classmethod
    def load_engine(cls, path: str | os.PathLike) -> TrtRunner:
        """A runner over an engine file written by `save_engine` (same TensorRT version and GPU model)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such engine file")
        runner = cls(None)
        runner._plan = path.read_bytes()
        if not runner._plan:
            raise InputError(f"{path}: the engine file is empty")
        return runner

    # ------------------------------------------------------------------ build
    def build_plan(self) -> bytes:
        """The serialized engine (built once); needs TensorRT and a GPU, not cuda-python."""
        if self._plan is not None:
            return self._plan
        trt = _import_tensorrt()
        features = trt_features(trt)
        self._logger = self._logger or _make_logger(trt)
        try:
            self._plan = self._build_serialized(trt, features)
        finally:
            self._remove_tmp()
        return self._plan

    def _build_serialized(self, trt, features: TrtFeatures) -> bytes:
        source = _model_source(self.model, self._make_tmp_dir)
        flags = precision_flags(features, fp16=self.fp16, int8=self.int8, strongly_typed=self.strongly_typed,
                                model_has_qdq=has_qdq(source.proto), model_has_fp16=has_float16(source.proto))
        builder = self._create_builder(trt)
        network = builder.create_network(network_flags(trt, features, self.strongly_typed))
        parser = trt.OnnxParser(network, self._logger)
        self._parse(parser, source)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        self._add_profile(builder, network, config)
        cache = self._load_timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise IrtoolError(f"TensorRT could not build the engine: {self._logger.last_errors()}")
        self._save_timing_cache(config, cache)
        log.info("built a %.1f MB TensorRT %s engine (flags: %s)", plan.nbytes / 2**20, features.version,
                 ", ".join(flags) or "none")
        return bytes(plan)

    def _create_builder(self, trt):
        try:
            builder = trt.Builder(self._logger)
        except (RuntimeError, TypeError) as e:
            raise BackendUnavailable(f"TensorRT cannot use a CUDA device ({e}); "
                                     "it needs an NVIDIA GPU and driver") from e
        if builder is None:
            raise BackendUnavailable(f"TensorRT cannot use a CUDA device: {self._logger.last_errors()}")
        return builder

    def _parse(self, parser, source: _Source) -> None:
        if source.data is not None:
            ok = parser.parse(source.data)
        else:
            ok = parser.parse_from_file(source.path)
        if ok:
            return
        errors = [_parser_error_text(parser.get_error(i), source.proto) for i in range(parser.num_errors)]
        shown = "; ".join(errors[:_MAX_PARSER_ERRORS]) or self._logger.last_errors()
        more = f" (and {len(errors) - _MAX_PARSER_ERRORS} more)" if len(errors) > _MAX_PARSER_ERRORS else ""
        raise InputError(f"TensorRT cannot parse the model: {shown}{more} (irtool trt-check MODEL lists known issues)")

    def _add_profile(self, builder, network, config) -> None:
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        unknown = sorted(set(self.shapes) - {t.name for t in inputs})
        if unknown:
            raise InputError(f"--shapes names {unknown}, which are not network inputs "
                             f"({', '.join(t.name for t in inputs)})")
        dynamic = [t for t in inputs if any(d < 0 for d in tuple(t.shape))]
        missing = [t.name for t in dynamic if t.name not in self.shapes]
        if missing:
            shown = ", ".join(f"{t.name} {tuple(t.shape)}" for t in dynamic if t.name in missing)
            raise InputError(f"inputs with dynamic dims need a profile: {shown}; give --shapes NAME:MIN,OPT,MAX")
        if not self.shapes:
            return
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            if tensor.name in self.shapes:
                shape = self.shapes[tensor.name]
                _check_profile_fits(tensor.name, tuple(tensor.shape), shape)
                profile.set_shape(tensor.name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(profile)

    def _load_timing_cache(self, config):
        if self.timing_cache is None:
            return None
        data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise InputError(f"{self.timing_cache}: TensorRT rejects this timing cache (other version or GPU?)")
        return cache

    def _save_timing_cache(self, config, cache) -> None:
        if cache is None:
            return
        serialized = config.get_timing_cache()
        _write_atomic(self.timing_cache, bytes(serialized.serialize()))

    def build(self) -> TrtRunner:
        """Build (or take the loaded) engine and create the execution context (idempotent)."""
        if self._context is not None:
            return self
        plan = self.build_plan()
        trt = _import_tensorrt()
        self._logger = self._logger or _make_logger(trt)
        cudart = _import_cudart()
        _require_cuda_device(cudart)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise InputError("TensorRT cannot deserialize the engine (built by another TensorRT version or for "
                             f"another GPU?): {self._logger.last_errors()}")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        return self

    # ------------------------------------------------------------------ run
    def io_names(self) -> tuple[list[str], list[str]]:
        """(input names, output names) of the engine, in engine order."""
        self.build()
        trt = _import_tensorrt()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; returns {output name: array} in engine output order."""
        inputs, outputs = self.io_names()
        _check_feed_names(feeds, inputs)
        trt = _import_tensorrt()
        cudart = _import_cudart()
        hosts = {name: self._host_input(trt, name, feeds[name]) for name in inputs}
        for name, array in hosts.items():
            self._set_input_shape(name, array.shape)
        for name in outputs:
            hosts[name] = self._host_output(trt, name)
        with _DeviceBuffers(cudart, hosts) as device:
            for name, ptr in device.pointers.items():
                self._context.set_tensor_address(name, ptr)
            device.upload(inputs, self._stream)
            if not self._context.execute_async_v3(int(self._stream)):
                raise IrtoolError(f"TensorRT failed while running the engine: {self._logger.last_errors()}")
            device.download(outputs, self._stream)
            _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: hosts[name] for name in outputs}

    def _host_input(self, trt, name: str, value) -> np.ndarray:
        array = np.asarray(value)
        dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InputError(f"input {name!r}: got {array.dtype}, the engine takes {dtype}")
        return np.require(array, dtype=dtype, requirements="C")  # keeps 0-d inputs 0-d

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, tuple(shape)):
            allowed = self._engine.get_tensor_profile_shape(name, 0) if self._engine.num_optimization_profiles else []
            raise InputError(f"input {name!r}: shape {tuple(shape)} does not fit the engine "
                             f"(min, opt, max = {[tuple(s) for s in allowed]})")

    def _host_output(self, trt, name: str) -> np.ndarray:
        shape = tuple(self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise IrtoolError(f"output {name!r} has a data-dependent shape {shape}; irtool's TensorRT runner "
                              "needs output shapes known from the input shapes")
        return np.empty(shape, dtype=np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))))

    # ------------------------------------------------------------------ files and lifetime
    def save_engine(self, path: str | os.PathLike) -> Path:
        """Write the serialized engine to `path` atomically (building it first if needed)."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: engine path is a directory")
        if not path.resolve().parent.is_dir():
            raise InputError(f"{path.parent}: folder does not exist")
        _write_atomic(path, self.build_plan())
        return path

    def close(self) -> None:
        if self._stream is not None:
            cudart = _import_cudart()
            _cuda(cudart, cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
        self._context = self._engine = self._runtime = None
        self._remove_tmp()

    def _make_tmp_dir(self) -> Path:
        self._tmp_dir = Path(tempfile.mkdtemp(prefix="irtool-trt-"))
        return self._tmp_dir

    def _remove_tmp(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> TrtRunner:
        return self.build()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_feed_names(feeds: dict[str, np.ndarray], expected: list[str]) -> None:
    missing = [n for n in expected if n not in feeds]
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputError(f"feeds do not match the engine inputs {expected}: missing {missing}, unknown {unknown}")


# ----------------------------------------------------------------------------------------- CUDA memory
def _cuda(cudart, result, what: str):
    """Unpack a cuda-python (err, value...) tuple, raising IrtoolError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise IrtoolError(f"CUDA error in {what}: {_cuda_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def _cuda_error_name(cudart, err) -> str:
    try:
        return cudart.cudaGetErrorName(err)[1].decode()
    except Exception:  # the name lookup itself failed: the enum's repr still says which error
        return str(err)


def _require_cuda_device(cudart) -> None:
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        reason = _cuda_error_name(cudart, err) if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendUnavailable(f"no CUDA device is available ({reason}): TensorRT needs an NVIDIA GPU and driver")


class _DeviceBuffers:
    """One device allocation per I/O tensor for one inference; freed on exit."""

    def __init__(self, cudart, hosts: dict[str, np.ndarray]):
        self.cudart = cudart
        self.hosts = hosts
        self.pointers: dict[str, int] = {}

    def __enter__(self) -> _DeviceBuffers:
        try:
            for name, array in self.hosts.items():
                self.pointers[name] = int(_cuda(self.cudart, self.cudart.cudaMalloc(max(array.nbytes, 1)),
                                                f"cudaMalloc({name})"))
        except BaseException:
            self.__exit__()
            raise
        return self

    def upload(self, names: list[str], stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in names:
            array = self.hosts[name]
            _cuda(self.cudart, self.cudart.cudaMemcpyAsync(self.pointers[name], array.ctypes.data, array.nbytes,
                                                           kind, stream), f"copy of {name} to the device")

    def download(self, names: list[str], stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in names:
            array = self.hosts[name]
            _cuda(self.cudart, self.cudart.cudaMemcpyAsync(array.ctypes.data, self.pointers[name], array.nbytes,
                                                           kind, stream), f"copy of {name} to the host")

    def __exit__(self, *exc: Any) -> None:
        for ptr in self.pointers.values():
            self.cudart.cudaFree(ptr)
        self.pointers.clear()


# ----------------------------------------------------------------------------------------- files
def _write_atomic(path: Path, data: bytes) -> None:
    from irtool.ir.io import atomic_write_bytes

    atomic_write_bytes(Path(path), data)


def build_engine(model, output: str | os.PathLike, **options: Any) -> Path:
    """Build a serialized engine for `model` and write it to `output`; options as for TrtRunner."""
    return TrtRunner(model, **options).save_engine(output)
