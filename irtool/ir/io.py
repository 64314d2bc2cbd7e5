"""Safe loading and atomic, deterministic saving of ONNX model files.

Loading refuses anything that is not a usable ONNX model with an InputError whose message fits on
one line: a missing or empty file, bytes that are not an ONNX protobuf, a protobuf that is not a
model, an opset newer than the installed onnx, and external data that is missing or whose location
escapes the model's folder (absolute paths, `..`, symlinks pointing out). Escaping locations are refused
before any byte of them is read. Models below MIN_OPSET load; `upgrade_opset` converts them for the IR.

Saving writes into a temporary file in the destination folder and renames it into place, so a
reader never sees a half-written file, and it never writes to the path it loaded from unless asked.
Models whose tensors exceed protobuf's 2 GB limit are written with external data beside the model.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from irtool.errors import InputError

log = logging.getLogger(__name__)

# The IR's passes write opset-13 forms (Squeeze/Split/ReduceSum axes as inputs, per-channel QuantizeLinear);
# older models are converted to it on load (upgrade_opset).
MIN_OPSET = 13
# Protobuf refuses to serialize messages of 2 GiB or more; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file when saving with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def max_supported_opset() -> int:
    return onnx.defs.onnx_opset_version()


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, validate and return a ModelProto with its external data loaded."""
    path = Path(path)
    _check_file(path)
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: not a valid ONNX protobuf ({_short(e)})") from e
    check_is_model(proto, str(path))
    load_external_data(proto, path.parent, str(path))
    return proto


def parse_model_bytes(data: bytes, origin: str = "<bytes>") -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise InputError(f"{origin}: not a valid ONNX protobuf ({_short(e)})") from e
    check_is_model(proto, origin)
    return proto


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def check_is_model(proto: onnx.ModelProto, origin: str) -> None:
    """A protobuf parses leniently: random bytes or another message type may decode as a ModelProto."""
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise InputError(f"{origin}: protobuf is not an ONNX model (no ir_version or no graph)")
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{origin}: ONNX model has an empty graph")
    opset = default_opset(proto)
    if opset is None:
        raise InputError(f"{origin}: model imports no default-domain opset")
    if opset > max_supported_opset():
        raise InputError(
            f"{origin}: opset {opset} is newer than this onnx supports ({max_supported_opset()}); "
            "upgrade the onnx package"
        )


def default_opset(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def upgrade_opset(proto: onnx.ModelProto, origin: str, *, keep_input: bool = True,
                  target: int = MIN_OPSET, why: str = "on load") -> onnx.ModelProto:
    """A new proto of `proto` at opset `target`, converted by onnx.version_converter (which rewrites the ops whose
    form changed, Softmax's axis semantics and If/Loop bodies included).

    The converter takes the model serialized, so the large initializers are held out of `proto` while it runs:
    a model past protobuf's 2 GB limit converts too, and a ResNet-50 in 0.13 s instead of 0.46 s. With
    `keep_input` `proto` ends as it started; without (a proto irtool read and drops), its tensors' bytes move to
    the new proto, which saves a copy of every weight."""
    opset = default_opset(proto)
    held = _hold_out(proto)
    try:
        try:
            converted = version_converter.convert_version(proto, target)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"{origin}: opset {opset} could not be upgraded to {target} "
                             f"by onnx.version_converter ({_converter_reason(e)})") from e
        _put_back(converted, held, origin)
    finally:
        if keep_input:
            _restore_held(held)
    # Opset 13 needs IR version 7; an IR 3 model's initializers are graph inputs, which the import drops.
    needed = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, needed)
    log.info("%s: opset %d upgraded to %d %s (onnx.version_converter)", origin, opset, target, why)
    return converted


_HELD_OUT = "irtool-held-out"
Held = dict[str, tuple[onnx.TensorProto, bytes, int | None]]


def _hold_out(proto: onnx.ModelProto) -> Held:
    """Take the raw bytes of the main graph's large initializers (their names are unique) out of `proto`, each
    marked as external data at `_HELD_OUT`; returns {name: (tensor, bytes, its data_location if set)}."""
    held = {}
    for tensor in proto.graph.initializer:
        if _is_large_raw(tensor):
            location = tensor.data_location if tensor.HasField("data_location") else None
            held[tensor.name] = (tensor, tensor.raw_data, location)
            external_data_helper.set_external_data(tensor, location=_HELD_OUT)  # needs the raw_data still there
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    return held


def _restore_held(held: Held) -> None:
    for tensor, raw, location in held.values():
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        if location is not None:
            tensor.data_location = location


def _put_back(converted: onnx.ModelProto, held: Held, origin: str) -> None:
    """Give the converted model's held-out initializers their bytes again, by name."""
    for tensor in external_data_helper._get_all_tensors(converted):
        if _external_location(tensor) != _HELD_OUT:
            continue
        if tensor.name not in held:  # the converter would have had to copy a tensor under a new name
            raise InputError(f"{origin}: onnx.version_converter renamed initializer {tensor.name!r}")
        tensor.raw_data = held[tensor.name][1]
        del tensor.external_data[:]
        tensor.ClearField("data_location")


def _converter_reason(e: BaseException) -> str:
    """The converter's message without its C++ source location."""
    text = _short(e)
    return text.split("failed: ", 1)[-1] if "Assertion" in text else text


def _external_location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(proto) if external_data_helper.uses_external_data(t)]


def external_locations(proto: onnx.ModelProto) -> list[str]:
    """The external-data files the model's tensors name, relative to the model's folder (`irtool opt --depfile`)."""
    return sorted({_external_location(t) for t in _external_tensors(proto)} - {""})


def load_external_data(proto: onnx.ModelProto, base_dir: Path, origin: str) -> None:
    """Check every external-data location first, then read them; nothing outside base_dir is read."""
    tensors = _external_tensors(proto)
    if not tensors:
        return
    base = base_dir.resolve()
    for tensor in tensors:
        location = _external_location(tensor)
        _check_location(location, base, tensor.name, origin)
    try:
        external_data_helper.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as e:
        raise InputError(f"{origin}: cannot read external data ({_short(e)})") from e


def _check_location(location: str, base: Path, tensor: str, origin: str) -> None:
    if not location:
        raise InputError(f"{origin}: tensor {tensor!r} uses external data without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise InputError(f"{origin}: tensor {tensor!r} external data location {location!r} is absolute; refused")
    if ".." in Path(location).parts:
        raise InputError(f"{origin}: tensor {tensor!r} external data location {location!r} "
                         "leaves the model folder; refused")
    target = (base / location).resolve()
    if base not in target.parents:
        raise InputError(f"{origin}: tensor {tensor!r} external data location {location!r} "
                         "leaves the model folder; refused")
    if not target.is_file():
        raise InputError(f"{origin}: tensor {tensor!r} external data file {location!r} is missing")


def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of tensor data in proto (subgraphs included), from dims x element size.

    Cheap on purpose: `len(t.raw_data)` copies every tensor, and with the upb protobuf backend
    `ByteSize()` serializes the whole message (and fails outright past 2 GiB).
    """
    total = 0
    for tensor in external_data_helper._get_all_tensors(proto):
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            total += tensor.ByteSize()
        else:
            total += _data_bytes(tensor)
    return total


def _data_bytes(tensor: onnx.TensorProto) -> int:
    """dims x element size (0 for STRING and UNDEFINED, which have no raw bytes to count)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _is_large_raw(tensor: onnx.TensorProto) -> bool:
    """A tensor whose raw bytes are worth moving out of the proto (written beside it, or held out of a copy)."""
    return tensor.HasField("raw_data") and _data_bytes(tensor) >= EXTERNAL_TENSOR_MIN_BYTES


def write_model_proto(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Atomically write proto to path; external_data=None decides by size (protobuf's 2 GB limit)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an output file path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if external_data is None:
        external_data = tensor_bytes(proto) >= EXTERNAL_DATA_THRESHOLD
    if external_data:
        _write_with_external_data(proto, path)
        return
    atomic_write_bytes(path, proto.SerializeToString(deterministic=True))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write into a temporary file beside `path`, then rename it into place: readers never see a
    partial file and a failure leaves no output. Every file irtool writes goes through here."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(path: str | Path) -> None:
    """mkstemp creates 0600 files; a saved model gets the permissions a plain open() would give."""
    os.chmod(path, 0o666 & ~_umask())


def _remove_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_with_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Write tensors to `<name>.data` beside the model; both files appear by rename, data first.

    The tensors' bytes move into the data file one at a time and the small remaining proto is
    serialized; afterwards each tensor is read back, so proto ends as it started without ever being
    held twice in memory (a CopyFrom of a 2 GB model would be).
    """
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    data_at, done = tmp_dir / data_name, False
    try:
        with open(data_at, "wb") as data:
            for tensor in _large_raw_tensors(proto):
                moved.append(_move_out(tensor, data, data_name))
            data.flush()
            os.fsync(data.fileno())
        atomic_write_bytes(tmp_dir / path.name, proto.SerializeToString(deterministic=True))
        _default_permissions(data_at)
        os.replace(data_at, path.parent / data_name)
        data_at = path.parent / data_name
        os.replace(tmp_dir / path.name, path)
        done = True
    finally:
        _restore(moved, data_at)
        if not done and data_at.parent != tmp_dir:
            _remove_quietly(data_at)  # the model never appeared, so its data must not either
        for leftover in tmp_dir.iterdir():
            _remove_quietly(leftover)
        tmp_dir.rmdir()
    log.info("saved %s with external data %s", path, data_name)


def _large_raw_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [tensor for tensor in external_data_helper._get_all_tensors(proto) if _is_large_raw(tensor)]


def _move_out(tensor: onnx.TensorProto, data, data_name: str) -> tuple[onnx.TensorProto, int, int]:
    offset = data.tell()
    length = data.write(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location=data_name, offset=offset, length=length)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return tensor, offset, length


def _restore(moved: list[tuple[onnx.TensorProto, int, int]], data_path: Path) -> None:
    if not moved:
        return
    with open(data_path, "rb") as data:
        for tensor, offset, length in moved:
            data.seek(offset)
            tensor.raw_data = data.read(length)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
