"""Where calibration samples come from: files (.npz, .npy folders, images), iterables, random numbers.

A source has `kind`, `count`, `samples(indices)` yielding (where, {input: raw array}) for sorted global
indices, and `digest(hash, indices)` feeding the fingerprint. File sources are lists of chunks (one per
file); headers are validated when the source is built. Streaming: .npy files are memory-mapped; .npz
members are read row by row from the zip stream (skipping unselected rows in small steps), so a large
.npz is never loaded whole, except a Fortran-ordered member.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.lib import format as npy_format

from irtool.backends.ort import INT_INPUT_HIGH
from irtool.calibration.images import IMAGE_SUFFIXES, Preprocess, load_image
from irtool.calibration.validate import (
    ModelInput,
    Sample,
    check_header,
    convert_sample,
    format_shape,
    map_keys,
    single_input,
    stack_count,
)
from irtool.errors import InputError

_SKIP_BYTES = 1 << 18


# ----------------------------------------------------------------------------------- .npy / .npz headers
class _Layout(NamedTuple):
    """Where one input's array lives in a file and how it is laid out."""

    member: str  # zip member for .npz, "" for .npy
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    stacked: bool


def _read_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(stream)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(stream)
    raise ValueError(f".npy format version {version} is not supported")


def _header_of(path: Path, member: str = "") -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        if member:
            with zipfile.ZipFile(path) as zf, zf.open(member) as stream:
                return _read_header(stream)
        with open(path, "rb") as stream:
            return _read_header(stream)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"calibration file {path}{':' + member if member else ''} is not a readable array: {e}") \
            from e


def _npz_keys(path: Path) -> dict[str, str]:
    """{key: zip member} of an .npz file."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"calibration file {path} is not a readable .npz: {e}") from e


def _layout(inp: ModelInput, path: Path, member: str, where: str) -> tuple[_Layout, int]:
    shape, fortran, dtype = _header_of(path, member)
    count = check_header(inp, shape, dtype, where)
    stacked = stack_count(inp, shape, where) is not None
    return _Layout(member, tuple(shape), fortran, dtype, stacked), count


def _member_rows(zf: zipfile.ZipFile, layout: _Layout, local: np.ndarray) -> Iterator[np.ndarray]:
    """Rows `local` (sorted) of an .npz member, read from the zip stream one row at a time."""
    with zf.open(layout.member) as stream:
        if not layout.stacked or layout.fortran:
            array = npy_format.read_array(stream, allow_pickle=False)
            yield from (array[i] for i in local) if layout.stacked else (array for _ in local)
            return
        _read_header(stream)
        row_shape = layout.shape[1:]
        row_bytes = math.prod(row_shape) * layout.dtype.itemsize
        position = 0
        for i in local:
            _skip(stream, (int(i) - position) * row_bytes)
            row = stream.read(row_bytes)
            if len(row) != row_bytes:
                raise EOFError(f"member {layout.member!r} ends before row {int(i)}")
            yield np.frombuffer(row, layout.dtype).reshape(row_shape)
            position = int(i) + 1


def _skip(stream: Any, size: int) -> None:
    # ZipExtFile.seek reads (and holds) up to 16 MB at a time; skip in small steps instead.
    while size > 0:
        chunk = stream.read(min(size, _SKIP_BYTES))
        if not chunk:
            return
        size -= len(chunk)


# ----------------------------------------------------------------------------------- file sources
@dataclass
class _Chunk:
    """The samples of one file: `rows(local)` yields {input: raw array} for sorted local indices."""

    path: Path
    count: int
    layouts: dict[str, _Layout]
    image: tuple[str, Preprocess] | None = None

    def rows(self, local: np.ndarray) -> Iterator[Sample]:
        try:
            yield from self._rows(local)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"calibration file {self.path} cannot be read: {e}") from e

    def _rows(self, local: np.ndarray) -> Iterator[Sample]:
        if self.image is not None:
            yield {self.image[0]: load_image(self.path, self.image[1])}
        elif self.path.suffix.lower() == ".npz":
            yield from self._npz_rows(local)
        else:
            yield from self._npy_rows(local)

    def _npy_rows(self, local: np.ndarray) -> Iterator[Sample]:
        (name, layout), = self.layouts.items()
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for i in local:
            yield {name: array[i] if layout.stacked else array}

    def _npz_rows(self, local: np.ndarray) -> Iterator[Sample]:
        with zipfile.ZipFile(self.path) as zf:
            readers = {name: _member_rows(zf, layout, local) for name, layout in self.layouts.items()}
            for _ in local:
                yield {name: next(reader) for name, reader in readers.items()}


def _file_digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            h.update(block)
    return h.digest()


class FileSource:
    """Samples spread over files (chunks); global index = offset of its chunk + index in the chunk."""

    def __init__(self, kind: str, root: Path, chunks: list[_Chunk], spec: Preprocess | None = None):
        self.kind, self.root, self.chunks, self.spec = kind, root, chunks, spec
        self.offsets = np.cumsum([0] + [c.count for c in chunks])
        self.count = int(self.offsets[-1])

    def _where(self, path: Path) -> str:
        return path.name if path == self.root else path.relative_to(self.root).as_posix()

    def _touched(self, indices: np.ndarray) -> Iterator[tuple[int, _Chunk, np.ndarray]]:
        bounds = np.searchsorted(indices, self.offsets)
        for k, chunk in enumerate(self.chunks):
            if bounds[k + 1] > bounds[k]:
                yield int(self.offsets[k]), chunk, indices[bounds[k]:bounds[k + 1]] - self.offsets[k]

    def samples(self, indices: np.ndarray) -> Iterator[tuple[str, Sample]]:
        for start, chunk, local in self._touched(indices):
            name = self._where(chunk.path)
            for i, sample in zip(local, chunk.rows(local), strict=True):
                yield f"sample {start + int(i)} (file {name})", sample

    def digest(self, h: Any, indices: np.ndarray) -> None:
        h.update(f"{self.kind}|{self.spec.text() if self.spec else ''}".encode())
        for _, chunk, local in self._touched(indices):
            h.update(self._where(chunk.path).encode() + b"\0" + _file_digest(chunk.path))
            h.update(np.asarray(local, "<i8").tobytes())


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Data files under `folder` by kind (npy, npz, image), sorted by relative path; hidden ones skipped."""
    kinds: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        kind = "image" if suffix in IMAGE_SUFFIXES else suffix[1:] if suffix in (".npy", ".npz") else None
        if kind is not None:
            kinds.setdefault(kind, []).append(path)
    return kinds


def _npz_chunk(path: Path, inputs: list[ModelInput], where: str) -> _Chunk:
    members = _npz_keys(path)
    mapping = map_keys(list(members), inputs, where)
    layouts, counts = {}, {}
    for inp in inputs:
        layouts[inp.name], counts[inp.name] = _layout(inp, path, members[mapping[inp.name]],
                                                      f"{where} key {mapping[inp.name]!r}")
    if len(set(counts.values())) > 1:
        raise InputError(f"{where}: inputs hold different numbers of samples "
                         f"({', '.join(f'{k!r}: {v}' for k, v in counts.items())})")
    return _Chunk(path, next(iter(counts.values())), layouts)


def _npy_chunk(path: Path, inp: ModelInput, where: str) -> _Chunk:
    layout, count = _layout(inp, path, "", where)
    return _Chunk(path, count, {inp.name: layout})


def open_path(path: Path, inputs: list[ModelInput], spec: Preprocess | None) -> FileSource:
    if path.is_file():
        kind = {".npz": "npz", ".npy": "npy"}.get(path.suffix.lower(),
                                                  "image" if path.suffix.lower() in IMAGE_SUFFIXES else "")
        if not kind:
            raise InputError(f"calibration data {path}: expected an .npz or .npy file, an image or a folder")
        files = [path]
    elif path.is_dir():
        kinds = _scan(path)
        if not kinds:
            raise InputError(f"calibration data {path}: the folder holds no .npy, .npz or image files")
        if len(kinds) > 1:
            raise InputError(f"calibration data {path}: the folder mixes {', '.join(sorted(kinds))} files; "
                             "keep one kind per folder")
        (kind, files), = kinds.items()
    else:
        raise InputError(f"calibration data {path}: no such file or folder")
    if spec is not None and kind != "image":
        raise InputError(f"--calib-preprocess applies to images; {path} holds {kind} data")
    return _build_source(kind, path, files, inputs, spec)


def _build_source(kind: str, root: Path, files: list[Path], inputs: list[ModelInput],
                  spec: Preprocess | None) -> FileSource:
    def where(p: Path) -> str:
        return f"file {p.name if p == root else p.relative_to(root).as_posix()}"

    if kind == "npz":
        chunks = [_npz_chunk(p, inputs, where(p)) for p in files]
    elif kind == "npy":
        inp = single_input(inputs, "a folder of .npy files")
        chunks = [_npy_chunk(p, inp, where(p)) for p in files]
    else:
        inp = single_input(inputs, "an image folder")
        spec = (spec or Preprocess()).for_input(inp.name, inp.dtype)
        convert_sample(inp, load_image(files[0], spec), f"{where(files[0])} after preprocessing")
        chunks = [_Chunk(p, 1, {}, image=(inp.name, spec)) for p in files]
    return FileSource(f"{kind} {'file' if root.is_file() else 'folder'}", root, chunks, spec)


# ----------------------------------------------------------------------------------- iterable / random sources
class IterableSource:
    """Samples from a re-iterable of dicts, per sample or batched; read once up front to count them."""

    kind = "iterable"

    def __init__(self, provider: Callable[[], Iterable[Any]], inputs: list[ModelInput]):
        self.provider, self.inputs = provider, inputs
        self.digests: list[bytes] = []
        for where, sample in self._split_all():
            h = hashlib.blake2b(digest_size=16)
            for inp in inputs:
                array = np.require(convert_sample(inp, sample[inp.name], where), requirements="C")
                h.update(f"{inp.name}|{array.dtype.str}|{array.shape}".encode() + array.tobytes())
            self.digests.append(h.digest())
        self.count = len(self.digests)

    def _split_all(self) -> Iterator[tuple[str, Sample]]:
        index = 0
        for number, item in enumerate(self.provider()):
            for sample in _split_item(item, self.inputs, f"calibration item {number}"):
                yield f"sample {index} (item {number})", sample
                index += 1

    def samples(self, indices: np.ndarray) -> Iterator[tuple[str, Sample]]:
        wanted, seen = iter(indices.tolist()), 0
        target = next(wanted, None)
        for seen, (where, sample) in enumerate(self._split_all(), start=1):
            if target is not None and seen - 1 == target:
                yield where, sample
                target = next(wanted, None)
        if seen != self.count:
            raise InputError(f"the calibration iterable yielded {seen} samples, {self.count} the first time; "
                             "it must yield the same data every time it is iterated")

    def digest(self, h: Any, indices: np.ndarray) -> None:
        h.update(b"iterable")
        for i in indices:
            h.update(self.digests[int(i)])


def _split_item(item: Any, inputs: list[ModelInput], where: str) -> Iterator[Sample]:
    if isinstance(item, np.ndarray) and len(inputs) == 1:
        item = {inputs[0].name: item}
    if not isinstance(item, Mapping):
        raise InputError(f"{where} is a {type(item).__name__}, expected a dict {{input name: array}}")
    mapping = map_keys([str(k) for k in item], inputs, where)
    arrays = {inp.name: np.asarray(item[mapping[inp.name]]) for inp in inputs}
    counts = {inp.name: stack_count(inp, arrays[inp.name].shape, where) for inp in inputs}
    # A batch as the model takes it gives a scalar input once, for all its samples.
    shared = {inp.name for inp in inputs if inp.scalar and counts[inp.name] is None}
    stacked = {v for k, v in counts.items() if k not in shared}
    if len(stacked) > 1 or (not stacked and len(set(counts.values())) > 1):
        raise InputError(f"{where}: inputs hold different numbers of samples "
                         f"({', '.join(f'{k!r}: {1 if v is None else v}' for k, v in counts.items())})")
    count = next(iter(stacked), None)
    if count is None:
        yield arrays
        return
    for i in range(count):
        yield {name: array if name in shared else array[i] for name, array in arrays.items()}


def provider_of(data: Any) -> Callable[[], Iterable[Any]]:
    """A zero-argument callable returning a fresh iterable of items, or an InputError."""
    if isinstance(data, (Mapping, np.ndarray)):
        return lambda: iter([data])
    if callable(data):
        return data
    if not isinstance(data, Iterable):
        raise InputError(f"calibration data: expected a path, an iterable or a callable, got {type(data).__name__}")
    if iter(data) is data:
        raise InputError("calibration data is a one-shot iterator, but passes read the data several times: "
                         "pass a list or a zero-argument callable that returns a fresh iterator")
    return lambda: iter(data)


class RandomSource:
    """Sample i is drawn from default_rng([seed, i]): the same whatever the batching or selection."""

    kind = "random"

    def __init__(self, inputs: list[ModelInput], count: int, seed: int):
        for inp in inputs:
            if inp.sample_shape is None or None in inp.sample_shape or inp.dtype is None:
                raise InputError(f"input {inp.name!r}: random calibration data needs a static shape and a dtype "
                                 f"after the batch axis; the model has {format_shape(inp.shape)}, {inp.dtype} "
                                 f"(give --input-shape {inp.name}:DxD..)")
        self.inputs, self.count, self.seed = inputs, count, seed

    def samples(self, indices: np.ndarray) -> Iterator[tuple[str, Sample]]:
        for i in indices.tolist():
            rng = np.random.default_rng([self.seed, i])
            yield f"sample {i}", {inp.name: _random_array(rng, inp) for inp in self.inputs}

    def digest(self, h: Any, indices: np.ndarray) -> None:
        h.update(f"random|{self.seed}|{[(i.name, str(i.dtype), i.shape) for i in self.inputs]}".encode())


def _random_array(rng: np.random.Generator, inp: ModelInput) -> np.ndarray:
    shape = inp.sample_shape
    if inp.dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if inp.dtype.kind in "iu":
        return rng.integers(0, INT_INPUT_HIGH, shape).astype(inp.dtype)
    return rng.standard_normal(shape).astype(inp.dtype)
