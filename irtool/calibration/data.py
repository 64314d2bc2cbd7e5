"""Calibration data: the input samples INT8 calibration and data-driven passes run the model on.

Every source gives the same thing, a re-iterable provider: `data()` returns a fresh iterator of
batches {input name: array with a leading batch axis (none for a scalar input)}, the shape
PassContext.calibration_data has.

Sources
  one .npz file        arrays keyed by input name, first axis = samples; a single-input model may use
                       any single key.
  folder of .npy       single-input models; each file holds one sample or a stack of samples.
  folder of .npz       each file holds one sample or a stack of samples per input, keyed by input name.
  image folder         .jpg .jpeg .png .bmp (single-input models), decoded with Pillow and prepared by
                       a `Preprocess` spec: resize the shorter side, center-crop, scale (1/255),
                       (x - mean) / std, channel order rgb/bgr/gray, layout nchw/nhwc.
  Python iterable      (API) a list, or a zero-argument callable returning a fresh iterator, of
                       {input name: array} dicts, per sample or batched. A one-shot iterator is
                       refused: passes read the data several times.
  random               only when asked for by name (`--calib-data random`); logs a warning.
Folders are scanned recursively, read in sorted path order; hidden and other files are ignored; one
folder holds one kind. Per array the rank decides: the input's rank means a stack (first axis =
samples), one less means one sample; an input of unknown rank takes stacks. A scalar (rank-0) input, such as
a diffusion timestep, has no batch axis: a sample holds a 0-d value, a stack a 1-d array, and a batch is fed
one value, so only samples that share it are batched together: up to MAX_OPEN_BATCHES batches fill at once, one
per value (a model of scalar inputs alone runs per sample).

Selection: when `samples` < available, numpy default_rng(seed).choice without replacement picks the
samples, sorted so files are read in order. `samples` > available clamps to all, with a warning.

Validation raises InputError naming the input and the sample or file: missing or extra names, rank,
static dims, dtype (float -> float is cast, int -> int is cast when the values fit; int data for a
float input, float for int, and anything else is refused), NaN/Inf, an empty set. Headers of file
sources (and the first image) are checked at construction, so bad data fails before any pass runs;
values are checked as they stream. A model input with a static first dim fixes the batch size; otherwise a
sample shaped unlike the batch it would join (sequences padded per batch, images of several sizes) starts a
new batch.

Memory: at most one batch is held (MAX_OPEN_BATCHES with scalar inputs), plus what a format forces: .npy files
are memory-mapped, .npz members are read row by row from the zip stream (a Fortran-ordered member is loaded whole).
ONNX Runtime's working memory grows with the batch: where optimize() and the CLI choose it (no --calib-batch-size),
a batch holds DEFAULT_BATCH_SIZE samples, or fewer where that many would keep more than ACTIVATION_BUDGET of live
activations (irtool.analysis.cost's peak estimate at the first sample's shapes). bench/highres_bench.py's U-Net at
512x512 keeps ~130 MB per sample: batches of 8, and calibration peaks at 1.8 GB instead of 3.4 GB in batches of 16.
Statistics do not depend on the batch size, so the choice changes how fast and how big, not the ranges.

`fingerprint()` hashes the source kind, preprocessing, selection and the bytes of the files holding
the selected samples (for iterables the selected samples' bytes): the key of on-disk statistic caches.

Code: this module holds the public API, selection and batching; validate.py the checks against the
model's inputs, sources.py the formats (and .npz streaming), images.py the image preprocessing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from irtool.calibration.images import Preprocess
from irtool.calibration.sources import IterableSource, RandomSource, open_path, provider_of
from irtool.calibration.validate import ModelInput, convert_sample, model_inputs, normalize_inputs
from irtool.errors import InputError
from irtool.usercode import is_file_spec

__all__ = ["CalibrationData", "ModelInput", "Preprocess", "as_calibration_data", "batch_rows", "first_batches",
           "model_inputs", "select_indices",
           "DEFAULT_BATCH_SIZE", "DEFAULT_RANDOM_SAMPLES", "RANDOM"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
ACTIVATION_BUDGET = 1 << 30  # live activation bytes a batch of the chosen size may keep (see the module docstring)
DEFAULT_RANDOM_SAMPLES = 16
MAX_OPEN_BATCHES = 4  # batches filled at once, one per value of the scalar inputs (a diffusion timestep)
RANDOM = "random"
_PROGRESS_SECONDS = 5.0


# ----------------------------------------------------------------------------------- selection / batching
def select_indices(total: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the samples to use: all, or a seeded choice without replacement."""
    if samples is not None and samples < 1:
        raise InputError(f"--calib-samples must be at least 1, got {samples}")
    if samples is None or samples >= total:
        if samples is not None and samples > total:
            log.warning("calibration data holds %d samples, fewer than the %d asked for: using all of them",
                        total, samples)
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False)).astype(np.int64)


def _batch_size(inputs: list[ModelInput], requested: int, samples: int) -> int:
    if requested < 1:
        raise InputError(f"--calib-batch-size must be at least 1, got {requested}")
    if all(inp.scalar for inp in inputs):  # the model runs once per batch: one sample each keeps the counts
        return 1
    fixed = {inp.shape[0] for inp in inputs if inp.shape and inp.shape[0] is not None}
    if not fixed:
        return requested
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes {sorted(fixed)}")
    batch = fixed.pop()
    if samples % batch:
        raise InputError(f"the model's inputs fix the batch to {batch}, and {samples} calibration samples are "
                         f"not a multiple of it: choose --calib-samples as a multiple of {batch}")
    if batch != requested:
        log.info("the model's inputs fix the batch to %d: calibration batches hold %d samples", batch, batch)
    return batch


def _put(buffer: np.ndarray, row: int, value: np.ndarray, name: str, where: str) -> None:
    if buffer.shape[1:] != value.shape:
        raise InputError(f"input {name!r}: {where} has shape {value.shape}, other samples in its batch "
                         f"{buffer.shape[1:]}; the model fixes the batch to {len(buffer)}, so samples of one "
                         "batch must match (resize/crop images, pad sequences to one length)")
    buffer[row] = value


def batch_rows(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the length of its batched inputs; 1 for a batch of scalar inputs alone."""
    if not batch:
        return 0
    return max((len(value) for value in batch.values() if np.ndim(value)), default=1)


def first_batches(batches: Iterable[Mapping[str, np.ndarray]], samples: int) -> Iterator[Mapping[str, np.ndarray]]:
    """The first of `batches` that hold `samples` samples (the last one may hold more), or all of them."""
    count = 0
    for batch in batches:
        yield batch
        count += batch_rows(batch)
        if count >= samples:
            return


def _reshaped(batch: dict[str, np.ndarray], sample: dict[str, np.ndarray]) -> bool:
    return any(batch[name].shape[1:] != value.shape for name, value in sample.items())


def _rescaled(batch: dict[str, np.ndarray], sample: dict[str, np.ndarray], scalars: list[str]) -> str | None:
    """The first scalar input whose value in `sample` differs from its batch's (fed once per batch), or None."""
    return next((name for name in scalars if batch[name][0] != sample[name]), None)


class _OpenBatch:
    """A batch being filled: one buffer per input, `size` samples long."""

    def __init__(self, first: dict[str, np.ndarray], size: int):
        self.arrays = {name: np.empty((size, *a.shape), a.dtype) for name, a in first.items()}
        self.filled = 0

    def put(self, sample: dict[str, np.ndarray], where: str) -> None:
        for name, value in sample.items():
            _put(self.arrays[name], self.filled, value, name, where)
        self.filled += 1

    @property
    def full(self) -> bool:
        return self.filled == len(next(iter(self.arrays.values())))

    def fed(self, scalars: list[str]) -> dict[str, np.ndarray]:
        """The samples so far as the model takes them: scalar inputs once, as 0-d arrays."""
        return {name: array[0, ...] if name in scalars else array[:self.filled] for name, array in self.arrays.items()}


# ----------------------------------------------------------------------------------- the public class
class CalibrationData:
    """A re-iterable provider of calibration batches: `data()` returns a fresh iterator of
    {input name: array with a leading batch axis}. Build it with from_path, from_iterable or random."""

    def __init__(self, source: Any, inputs: list[ModelInput], indices: np.ndarray,
                 batch_size: int = DEFAULT_BATCH_SIZE, description: str = ""):
        self._source, self.inputs, self.indices = source, inputs, indices
        self.batch_size = _batch_size(inputs, batch_size, len(indices))
        self.batch_fixed = any(inp.shape and inp.shape[0] is not None for inp in inputs)
        self._scalars = [inp.name for inp in inputs if inp.scalar]
        self.description = description or source.kind
        self._fingerprint: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._batches()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._batches()

    def __repr__(self) -> str:
        return f"CalibrationData({self.description}, samples={self.num_samples}, batch_size={self.batch_size})"

    def with_batch_size(self, batch_size: int) -> CalibrationData:
        """The same samples from the same source, in batches of `batch_size`."""
        return CalibrationData(self._source, self.inputs, self.indices, batch_size, self.description)

    def first_sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each input in the first selected sample (read alone, as `data()` would convert it)."""
        samples = self._source.samples(self.indices[:1])
        try:
            where, sample = next(samples)
        finally:
            samples.close()
        return {inp.name: convert_sample(inp, sample[inp.name], where).shape for inp in self.inputs}

    def fingerprint(self) -> str:
        """A stable hex digest of the selected samples and the selection, for statistic caches."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=20)
            h.update(b"irtool-calibration-v1|" + repr([(i.name, str(i.dtype)) for i in self.inputs]).encode())
            self._source.digest(h, self.indices)
            h.update(self.indices.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        remaining = self.num_samples
        # Batches being filled, by the values of the scalar inputs (one key, (), for models without them), oldest
        # first: a timestep drawn per sample would otherwise give batches of one sample. At most
        # MAX_OPEN_BATCHES are held; statistics are per sample and order-free, so the grouping changes none.
        open_batches: dict[tuple, _OpenBatch] = {}
        last_log = time.monotonic()
        for where, sample in self._source.samples(self.indices):
            converted = {inp.name: convert_sample(inp, sample[inp.name], where) for inp in self.inputs}
            key = tuple(converted[name].item() for name in self._scalars)
            if self.batch_fixed and open_batches and key not in open_batches:
                self._refuse_mixed_scalars(next(iter(open_batches.values())), converted, where)
            current = open_batches.get(key)
            if current is not None and not self.batch_fixed and _reshaped(current.arrays, converted):
                # A sample shaped unlike its batch-mates (text padded per batch, images of several sizes) closes
                # the batch early: statistics are per sample, so where a batch ends changes none of them.
                yield open_batches.pop(key).fed(self._scalars)
                current = None
            if current is None:
                if len(open_batches) >= MAX_OPEN_BATCHES:
                    yield open_batches.pop(next(iter(open_batches))).fed(self._scalars)
                current = open_batches[key] = _OpenBatch(converted, self.batch_size)
            current.put(converted, where)
            remaining -= 1
            if current.full:
                yield open_batches.pop(key).fed(self._scalars)
            if time.monotonic() - last_log > _PROGRESS_SECONDS:
                log.info("calibration data: %d of %d samples read", self.num_samples - remaining, self.num_samples)
                last_log = time.monotonic()
        for batch in open_batches.values():
            yield batch.fed(self._scalars)
        if remaining:
            raise InputError(f"calibration data {self.description}: {remaining} of {self.num_samples} "
                             "samples went missing while reading")

    def _refuse_mixed_scalars(self, batch: _OpenBatch, sample: dict[str, np.ndarray], where: str) -> None:
        changed = _rescaled(batch.arrays, sample, self._scalars)
        raise InputError(f"input {changed!r}: {where} has the value {sample[changed]}, other samples in its batch "
                         f"{batch.arrays[changed][0]}; the model fixes the batch to {len(batch.arrays[changed])} and "
                         f"takes {changed!r} once per batch, so samples of one batch must share it")

    # ------------------------------------------------------------------------------- constructors
    @classmethod
    def _select(cls, source: Any, inputs: list[ModelInput], samples: int | None, seed: int, batch_size: int,
                description: str) -> CalibrationData:
        if source.count == 0:
            raise InputError(f"calibration data {description} holds no samples")
        indices = select_indices(source.count, samples, seed)
        log.info("calibration data: %d of %d samples from %s", len(indices), source.count, description)
        return cls(source, inputs, indices, batch_size, description)

    @classmethod
    def from_path(cls, path: str | os.PathLike, model_inputs: Iterable[Any], samples: int | None = None,
                  seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                  preprocess: str | Preprocess | None = None) -> CalibrationData:
        """An .npz file, a folder of .npy or .npz files, or an image folder (see the module docstring)."""
        inputs = normalize_inputs(model_inputs)
        spec = Preprocess.parse(preprocess) if isinstance(preprocess, str) else preprocess
        source = open_path(Path(path), inputs, spec)
        return cls._select(source, inputs, samples, seed, batch_size, f"{source.kind} {path}")

    @classmethod
    def from_iterable(cls, data: Any, model_inputs: Iterable[Any], samples: int | None = None, seed: int = 0,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> CalibrationData:
        """A list (or a callable returning fresh iterators) of {input name: array} dicts, per sample or batched."""
        inputs = normalize_inputs(model_inputs)
        source = IterableSource(provider_of(data), inputs)
        return cls._select(source, inputs, samples, seed, batch_size, "iterable")

    @classmethod
    def random(cls, model_inputs: Iterable[Any], samples: int | None = DEFAULT_RANDOM_SAMPLES, seed: int = 0,
               batch_size: int = DEFAULT_BATCH_SIZE) -> CalibrationData:
        """Random samples (floats ~N(0,1)); only on explicit request: statistics will not be representative."""
        inputs = normalize_inputs(model_inputs)
        count = DEFAULT_RANDOM_SAMPLES if samples is None else samples
        if count < 1:
            raise InputError(f"--calib-samples must be at least 1, got {count}")
        log.warning("calibrating on %d random samples: quantization ranges and data-driven decisions will not "
                    "represent real inputs, and accuracy may suffer; pass real data with --calib-data PATH", count)
        source = RandomSource(inputs, count, seed)
        return cls(source, inputs, np.arange(count, dtype=np.int64), batch_size, f"random (seed {seed})")


def as_calibration_data(data: Any, model: Any, *, samples: int | None = None, seed: int = 0,
                        batch_size: int | None = None, preprocess: str | Preprocess | None = None,
                        input_shapes: Mapping[str, list[int]] | None = None) -> CalibrationData | None:
    """What optimize() and the CLI accept, as CalibrationData: None, a CalibrationData, the string
    "random", a path, or an iterable/callable of dicts. Validated against `model`'s inputs."""
    if data is None:
        if samples is not None or preprocess is not None:
            raise InputError("--calib-samples and --calib-preprocess need --calib-data")
        return None
    inputs = model_inputs(model, input_shapes)
    batch = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(data, CalibrationData):
        if [i.name for i in data.inputs] != [i.name for i in inputs]:
            raise InputError(f"calibration data was built for inputs {[i.name for i in data.inputs]}, "
                             f"the model has {[i.name for i in inputs]}")
        return data
    if isinstance(data, str) and data == RANDOM:
        return CalibrationData.random(inputs, samples, seed, batch)
    if isinstance(data, str) and is_file_spec(data) and not Path(data).exists():
        if preprocess is not None:
            raise InputError("--calib-preprocess applies to image folders, not to Python data providers")
        return CalibrationData.from_iterable(_user_provider(data), inputs, samples, seed, batch)
    if isinstance(data, (str, os.PathLike)):
        built = CalibrationData.from_path(data, inputs, samples, seed, batch, preprocess)
    elif preprocess is not None:
        raise InputError("--calib-preprocess applies to image folders, not to Python iterables")
    else:
        built = CalibrationData.from_iterable(data, inputs, samples, seed, batch)
    return built if batch_size is not None else fit_batch_to_memory(built, model)


def fit_batch_to_memory(data: CalibrationData, model: Any) -> CalibrationData:
    """`data` in batches small enough that the model's live activations stay within ACTIVATION_BUDGET (one sample
    at least); as it is where they already do, or where the model fixes the batch."""
    if data.batch_size <= 1 or data.batch_fixed:
        return data
    per_sample = activation_bytes(model, data.inputs, data.first_sample_shapes())
    fits = max(1, ACTIVATION_BUDGET // per_sample) if per_sample else data.batch_size
    if fits >= min(data.batch_size, data.num_samples):  # every batch, the only one included, already fits
        return data
    log.info("calibration batches hold %d samples, not %d: the model keeps up to %.0f MB of activations per sample "
             "(--calib-batch-size sets the batch)", fits, data.batch_size, per_sample / 2**20)
    return data.with_batch_size(fits)


def activation_bytes(model: Any, inputs: list[ModelInput], sample_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Peak live activation bytes of one sample (values of unknown size count 0)."""
    from irtool.analysis.cost import model_cost

    shapes = {inp.name: list(sample_shapes[inp.name]) if inp.scalar else [1, *sample_shapes[inp.name]]
              for inp in inputs}
    return model_cost(model, shapes).peak_activation_bytes


def _user_provider(spec: str) -> Any:
    """`--calib-data path/to/file.py:NAME`: NAME is a function taking no arguments (a generator function too)
    that returns an iterable of {input name: array} dicts, per sample or batched, or such a list itself. It is
    called once per pass that reads the data (calibrate, bias-correct, smooth), so it must give the same data
    every time: seed what it draws."""
    import inspect

    from irtool.usercode import load_name

    found = load_name(spec, "--calib-data")
    if callable(found):
        try:
            inspect.signature(found).bind()
        except TypeError as e:
            raise InputError(f"--calib-data {spec!r}: {spec.rpartition(':')[2]} must take no arguments ({e})") from e
        except ValueError:  # no signature to inspect (a builtin): let the call tell
            pass
    return found
