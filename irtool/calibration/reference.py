"""A float reference for the pass after `calibrate`, taken in calibrate's own pass over the data.

bias-correct{mode=empirical} compares each layer's per-channel output mean in the quantized model with the float
model's over the first calibration samples, and checks the corrected model's output SQNR against the float outputs.
Both came from a float pass of its own over those samples, right after calibrate's float pass over the same data.
When the pass after calibrate asks (Pass.float_request), calibrate's session also reduces the layers' outputs per
sample and channel (the reductions bias-correct's own pass used) and keeps the first model outputs, and the pass
finds them as analysis FloatReference: on bench/highres_bench.py's U-Net at 512x512 this saves a float pass of about
11 s (BENCHMARKS.md). The analytic mode's input means over every sample are taken the same way (Request.totals). The
pass takes them only if its samples are the ones recorded (per-sample fingerprints of the inputs: a data source need
not give the same samples twice; the analytic mode reads the data again to check) and every value it measures was
recorded; else it runs its own float pass as before. Like any analysis, the record is dropped by a pass that
changes the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from irtool.calibration.data import batch_rows
from irtool.calibration.tap import Phases, channel_sums, sample_channel_sums
from irtool.passmanager import Analysis


@dataclass(frozen=True)
class Request:
    """What to record: the per-channel sums of `axes` ({value: channel axis}) per sample over the first `samples`
    samples (whole batches), and the model outputs of those samples up to `output_bytes` (0: none; whole batches,
    one at least); with `totals`, also each value's sums over every sample (bias-correct's analytic mode)."""

    axes: Mapping[str, int]
    samples: int = 0
    output_bytes: int = 0
    totals: bool = False


class FloatReference(Analysis):
    """calibrate's Recorded for the pass after it; None when calibrate recorded nothing (it is never computed)."""

    name = "float-reference"

    def compute(self, model, ctx) -> None:
        return None


@dataclass
class Recorded:
    """Per sample, in order: the sums {value: [(per-channel float64 sum, values summed per channel), ...]} and the
    first model outputs concatenated ({name: array}; None: not kept); the sums over every sample {value: (sum,
    count)} when asked (else empty); the inputs' fingerprints [samples, k] of every sample read."""

    sums: dict[str, list[tuple[np.ndarray, int]]]
    prints: np.ndarray
    outputs: dict[str, np.ndarray] | None
    totals: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)

    def serves(self, names: Iterable[str], batches: Iterable[Mapping[str, np.ndarray]], every: bool = False) -> bool:
        """Whether every value in `names` was recorded (per sample; with `every`, in totals) over the samples of
        `batches`, and those are the samples recorded, in order (with `every`, all of them)."""
        recorded = self.totals if every else self.sums
        if not all(name in recorded for name in names):
            return False
        seen = 0
        for batch in batches:
            prints = fingerprints(batch)
            mine = self.prints[seen:seen + len(prints)]
            if mine.shape != prints.shape or not np.allclose(prints, mine, rtol=1e-9, atol=0.0):
                return False
            seen += len(prints)
        return seen == len(self.prints) or not every

    def output_batches(self, rows: Iterable[int]) -> list[dict[str, np.ndarray]]:
        """The kept outputs cut into batches of `rows` samples, as far as they go."""
        if not self.outputs:
            return []
        kept = len(next(iter(self.outputs.values())))
        cut, start = [], 0
        for count in rows:
            if start + count > kept:
                break
            cut.append({name: value[start:start + count] for name, value in self.outputs.items()})
            start += count
        return cut


@dataclass
class Recorder:
    """Fed each batch of calibrate's pass (tap): its inputs, the values fetched, and how `request.axes` were
    reduced in the graph (tap.pool_values). `outputs`: the model's output names; `phases`: the requested values
    that the pass's model holds only as another's phases (a ConvTranspose calibrate runs restored)."""

    request: Request
    outputs: list[str]
    phases: dict[str, Phases] = field(default_factory=dict)
    sums: dict[str, list[tuple[np.ndarray, int]]] = field(default_factory=dict)
    totals: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)  # values whose first axis is not the batch's
    prints: list[np.ndarray] = field(default_factory=list)
    kept: list[dict[str, np.ndarray]] = field(default_factory=list)
    kept_bytes: int = 0
    samples: int = 0

    def add(self, batch: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], reduced: Mapping) -> None:
        first = self.samples < self.request.samples
        if not first and not self.request.totals:
            return
        rows = batch_rows(batch)
        self.prints.append(fingerprints(batch))
        for name, axis in self.request.axes.items():
            if self.request.totals:  # summed in batch order, as channel_means sums its parts
                total, count = channel_sums(values, name, axis, reduced.get(name))
                before = self.totals.get(name, (0.0, 0))
                self.totals[name] = (before[0] + total, before[1] + count)
            if first:
                self._add_samples(name, axis, values, reduced, rows)
        self.samples += rows
        if first:
            self._keep_outputs(values, rows)

    def _add_samples(self, name: str, axis: int, values: Mapping[str, np.ndarray], reduced: Mapping,
                     rows: int) -> None:
        found = None if name in self.lost else sample_channel_sums(values, name, axis, reduced.get(name), rows)
        if found is None:
            self.lost.add(name)
            return
        sums, count = found
        self.sums.setdefault(name, []).extend((row, count) for row in sums)

    def _keep_outputs(self, values: Mapping[str, np.ndarray], rows: int) -> None:
        if not self.request.output_bytes or self.kept_bytes < 0:
            return
        size = sum(values[name].nbytes for name in self.outputs)
        if self.kept and self.kept_bytes + size > self.request.output_bytes:
            self.kept_bytes = -1  # full: later batches are not kept, so the kept ones stay the first
            return
        if any(np.ndim(values[name]) == 0 or np.shape(values[name])[0] != rows for name in self.outputs):
            self.kept, self.kept_bytes = [], -1  # an output without the batch axis cannot be cut per sample
            return
        self.kept.append({name: np.array(values[name]) for name in self.outputs})  # copied: see tap.detached
        self.kept_bytes += size

    def result(self) -> Recorded | None:
        """What was recorded, or None when no batch came (calibrate read its statistics from its cache)."""
        if not self.prints:
            return None
        sums = {name: parts for name, parts in self.sums.items() if name not in self.lost}
        outputs = {name: np.concatenate([batch[name] for batch in self.kept]) for name in self.outputs} \
            if self.kept else None
        return Recorded(sums, np.concatenate(self.prints), outputs, dict(self.totals))


def fingerprints(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """[rows, 2 * inputs]: each sample's sum and sum of squares of each input (float64), in input name order. An
    input without the batch axis (a scalar fed once per batch) gives every sample its own."""
    rows = batch_rows(batch)
    columns = []
    for name in sorted(batch):
        value = np.asarray(batch[name])
        if value.ndim == 0 or value.shape[0] != rows:
            flat = np.full((rows, 1), value.astype(np.float64).sum())
        else:
            flat = value.reshape(rows, -1).astype(np.float64)
        columns += [flat.sum(axis=1), np.einsum("ij,ij->i", flat, flat)]
    return np.stack(columns, axis=1)
