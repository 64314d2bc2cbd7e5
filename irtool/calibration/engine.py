"""The calibration engine: one streaming pass of ONNX Runtime over the calibration data.

The tensors to observe are summarized inside a copy of the model (irtool.calibration.tap: for minmax the min,
max and a NaN/Inf flag; for histogram-based methods a fixed strided subsample per sample, whose extremes stand
for the tensor's, and the flag; the activations themselves never leave ONNX Runtime) and every batch updates
one MinMax and, for histogram-based methods, one Histogram per tensor (irtool.calibration.observers). Nothing
is kept per sample, so memory is flat in the number of samples; statistics are batch-size invariant and
mergeable. With a cache folder, statistics are stored as .npz keyed by a hash of the model, the data's
fingerprint and the observer settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from irtool.calibration.data import batch_rows
from irtool.calibration.observers import DEFAULT_BINS, Histogram, MinMax, values_per_sample
from irtool.calibration.tap import Summary, tap
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.progress import bar

if TYPE_CHECKING:
    from irtool.calibration.reference import Recorder

log = logging.getLogger(__name__)
Provider = Callable[[], Iterable[Mapping[str, np.ndarray]]]
CACHE_VERSION = 4  # 2: histogram methods take extremes from the sample; 3: but not of `exact` tensors;
# 4: [N, C, H, W] row samples spread over each channel's rows (observers.row_indices)


@dataclass
class TensorStats:
    minmax: MinMax
    histogram: Histogram | None = None


@dataclass
class Timings:
    """Where a calibration's wall time went, in seconds: reading the data, waiting for the calibration session
    (built while the first batches are read: schedule.build_while_reading), running it (with the summaries'
    numpy finish), feeding the observers (the histograms' binning), and the range search (the calibrate
    pass's, after collect)."""
    data: float = 0.0
    session: float = 0.0
    inference: float = 0.0
    observe: float = 0.0
    search: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def collect(model: Model, names: list[str], provider: Provider, *, histograms: bool, bins: int = DEFAULT_BINS,
            cache_dir: str | None = None, progress: bool = False, timings: Timings | None = None,
            exact: Collection[str] = (), recorder: Recorder | None = None) -> dict[str, TensorStats]:
    """Statistics of `names` over every batch `provider()` yields (from the cache when possible); `timings`,
    when given, receives the time spent per stage. The extremes of `exact` are reduced exactly, also for
    histograms (tap). A `recorder` is fed by the same pass (reference.py); from the cache it gets nothing."""
    timings = timings if timings is not None else Timings()
    per_sample = values_per_sample(getattr(provider, "num_samples", None)) if histograms else 0
    key = _cache_key(model, names, provider, per_sample, bins, sorted(exact)) if cache_dir else None
    if key is not None:
        cached = _load(Path(cache_dir) / f"{key}.npz", names, bins)
        if cached is not None:
            log.info("calibration statistics loaded from cache %s", key[:12])
            return cached
    stats = {n: TensorStats(MinMax(), Histogram(bins, per_sample) if histograms else None) for n in names}
    started, batches, sizes = time.perf_counter(), 0, []
    summaries_of = tap(model, names, _sized(provider(), sizes, timings), summary=per_sample,
                       sample_extremes=histograms, timings=timings, exact=exact, recorder=recorder)
    bar_total = getattr(provider, "num_batches", None)
    pool = Binning(binning_workers() if histograms else 1)
    try:
        for summaries in _timed(bar(summaries_of, progress, "calibrating", "batch", bar_total), timings):
            batches += 1
            observed = time.perf_counter()
            _observe_batch(stats, summaries, pool)
            timings.observe += time.perf_counter() - observed
    finally:
        pool.close()
    samples = sum(sizes)
    if batches == 0:
        raise InputError("calibration data is empty")
    log.info("calibrated %d tensors on %d batches (%d samples) in %.2f s (data %.2f s, session %.2f s, "
             "inference %.2f s, observe %.2f s)", len(names), batches, samples, time.perf_counter() - started,
             timings.data, timings.session, timings.inference, timings.observe)
    if key is not None:
        _save(Path(cache_dir) / f"{key}.npz", stats)
    return stats


def _sized(batches: Iterable[Mapping[str, np.ndarray]], sizes: list[int], timings: Timings):
    """Pass batches through, noting each one's number of samples and the time spent reading it."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(iterator, None)
        timings.data += time.perf_counter() - started
        if batch is None:
            return
        sizes.append(batch_rows(batch))
        yield batch


def _timed(summaries: Iterable[dict], timings: Timings) -> Iterator[dict]:
    """Pass the summaries through; what their production cost beyond reading the data and building the
    session (which `_sized` and `tap` book) is the inference."""
    iterator = iter(summaries)
    while True:
        started, before = time.perf_counter(), timings.data + timings.session
        summary = next(iterator, None)
        timings.inference += time.perf_counter() - started - (timings.data + timings.session - before)
        if summary is None:
            return
        yield summary


def _observe_batch(stats: dict[str, TensorStats], summaries: dict[str, Summary], pool: Binning) -> None:
    """Feed one batch's summaries to the observers, then empty the dict: the generators in between still hold
    it while the next batch runs, and its samples (the ViT of bench/quant_bench.py: 243 MB a batch at 64
    samples) would stay alive beside the next batch's."""
    items = list(summaries.items())
    extremes = pool.count([(stats[name].histogram, summary) for name, summary in items])
    for (name, summary), sample_extremes in zip(items, extremes, strict=True):
        _observe(stats[name], name, summary, sample_extremes)
    summaries.clear()


def _count_sample(histogram: Histogram | None, summary: Summary) -> tuple[float, float] | None:
    """Count a summary's sample into its histogram; the sample's extremes (NaN when it holds NaN or Inf), or None
    when nothing was counted."""
    if summary.finite and histogram is not None and summary.sample is not None:
        return histogram.add_sample(summary.sample)
    return None


def _observe(stats: TensorStats, name: str, summary: Summary, sample_extremes: tuple[float, float] | None) -> None:
    low, high, finite = summary.low, summary.high, summary.finite
    if sample_extremes is not None and high is None:
        # the extremes are the sample's (tap's sample_extremes); low holds its producer's floor
        sample_low, sample_high = sample_extremes
        low = low if low > -math.inf and summary.sample.size else sample_low
        high, finite = sample_high, not math.isnan(sample_high)
    if not finite:
        raise InputError(f"tensor {name!r} holds NaN or Inf on the calibration data: the float model "
                         "overflows or divides by zero on these inputs")
    stats.minmax.merge(MinMax(low, high))


class Binning:
    """Counts a batch's samples into their histograms on every core. ONNX Runtime's threads idle while the
    histograms bin, and the compiled kernel releases the GIL, so binning different tensors side by side is
    nearly free parallelism (the ViT of bench/quant_bench.py: binning was a third of its float inference at 64
    samples, on one core of two). Each histogram is counted by one thread, so the counts do not depend on the
    number of threads or on scheduling."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="irtool-binning") if workers > 1 else None

    def count(self, jobs: list[tuple[Histogram | None, Summary]]) -> list[tuple[float, float] | None]:
        if self._pool is None:
            return [_count_sample(h, s) for h, s in jobs]
        shares = _balanced(jobs, self.workers)
        futures = [self._pool.submit(_count_all, jobs, share) for share in shares[1:]]
        results: dict[int, tuple[float, float] | None] = _count_all(jobs, shares[0])
        for future in futures:
            results.update(future.result())
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _count_all(jobs: list[tuple[Histogram | None, Summary]], indices: list[int]) -> dict:
    return {i: _count_sample(*jobs[i]) for i in indices}


def _balanced(jobs: list[tuple[Histogram | None, Summary]], workers: int) -> list[list[int]]:
    """Job indices split into `workers` shares of about equal sample size (largest first, each to the lightest)."""
    def size(i: int) -> int:
        sample = jobs[i][1].sample
        return sample.size if sample is not None else 0

    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(jobs)), key=lambda i: (-size(i), i)):
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += size(i)
    return shares


def binning_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------- cache
def _cache_key(model: Model, names: list[str], provider: Provider, per_sample: int, bins: int,
               exact: list[str]) -> str | None:
    fingerprint = getattr(provider, "fingerprint", None)
    if fingerprint is None:
        log.warning("calibration cache skipped: the data source has no fingerprint")
        return None
    digest = hashlib.sha256()
    digest.update(model.to_proto().SerializeToString(deterministic=True))
    digest.update(json.dumps({"v": CACHE_VERSION, "data": fingerprint(), "names": names, "per_sample": per_sample,
                              "bins": bins, "exact": exact}, sort_keys=True).encode())
    return digest.hexdigest()


def _save(path: Path, stats: dict[str, TensorStats]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for i, (name, s) in enumerate(sorted(stats.items())):
        arrays[f"name_{i}"] = np.array(name)
        arrays[f"minmax_{i}"] = np.array([s.minmax.low, s.minmax.high])
        if s.histogram is not None:
            arrays[f"counts_{i}"] = s.histogram.counts
            arrays[f"radius_{i}"] = np.array(s.histogram.radius)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load(path: Path, names: list[str], bins: int) -> dict[str, TensorStats] | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        stats = {}
        i = 0
        while f"name_{i}" in data:
            minmax = MinMax(*(float(v) for v in data[f"minmax_{i}"]))
            hist = None
            if f"counts_{i}" in data:
                hist = Histogram(bins)
                hist.counts, hist.radius = data[f"counts_{i}"].copy(), float(data[f"radius_{i}"])
            stats[str(data[f"name_{i}"])] = TensorStats(minmax, hist)
            i += 1
    return stats if set(stats) == set(names) else None
