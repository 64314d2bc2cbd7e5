"""Streaming activation statistics whose state does not grow with the number of samples.

MinMax     running min and max.
Histogram  a fixed number of bins B over [-R, R], where R is always the smallest power of two strictly
           above every |value| seen so far. When a batch exceeds R, R doubles (as often as needed) and
           each pair of neighbouring bins merges into one, which is exact: a value's bin at 2R is the
           merge of its bin at R. Hence the final histogram depends only on the set of values, never
           on batch boundaries or order, and two observers merge exactly (bring both to the larger R,
           add). Each sample contributes about `max_per_sample` values, taken at fixed positions of
           that sample (`subsample`), so the subsample too is independent of how samples are batched.
           The engine sizes it by the calibration set (`values_per_sample`): 16384 values per sample, a
           million values per tensor at 64 samples, down to 4096 per sample from 1024 samples on. (At
           65536, copying the subsamples out of ONNX Runtime and binning them cost ResNet-50 calibration
           about 0.5x the float inference.)

Range methods on a histogram (all return a symmetric threshold T on |x|, then clipped to min/max):
  percentile  the p-th percentile of |x|
  entropy     TensorRT's KL-divergence calibration: for each candidate T, P = the |x| histogram up to
              T with the clipped tail folded into the last bin, Q = P quantized to 128 levels and
              expanded back (empty bins stay empty); pick the T minimizing KL(P || Q). As in NVIDIA's
              implementation the zero bin is replaced by its neighbour (ReLU's zeros would dominate),
              and, because KL is degenerate on spiky discrete data, T is never below the 99th
              percentile of |x|. Cuts are searched coarse to fine (~64 evenly spaced, then around the best),
              all of a round in one evaluation that works per chunk from prefix sums (compiled, or numpy)
  mse         the T minimizing the expected squared error of int8 quantization: clipping error
              Σ_{|x|>T} (|x|−T)² plus rounding error Δ²/12 per unclipped value, Δ = T/127,
              over every bin edge at once (suffix sums of the counts, first and second moments)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

try:  # the compiled kernels (irtool/calibration/_binning.c): the same counts and ranges as the numpy paths, faster
    from irtool.calibration import _binning
except ImportError:  # built without a C compiler
    _binning = None

DEFAULT_BINS = 4096
DEFAULT_MAX_PER_SAMPLE = 1 << 14
MIN_PER_SAMPLE = 1 << 12
QUANT_LEVELS = 128
ENTROPY_FLOOR_PERCENTILE = 99.0


def values_per_sample(samples: int | None) -> int:
    """The histogram subsample size for a calibration of `samples` samples: 16384 values per sample up to 255
    samples, halved each time the count quadruples, never below 4096 (8192 from 256, 4096 from 1024). So a
    tensor's histogram holds ~1M values at 64 samples and keeps growing with the set (4M at 1024), while the
    binning, the largest cost of histogram calibration after the float inference itself (ViT: 0.4x of it at
    16384), stops growing faster than the set's diversity: values of one sample are strongly correlated, so
    more samples at fewer values each estimate the distribution at least as well. Fixed by the total count
    before the first batch, it keeps the statistics batch-size invariant; shards of one calibration use the
    total's value, so their histograms still merge."""
    per_sample, threshold = DEFAULT_MAX_PER_SAMPLE, 256
    while samples and samples >= threshold and per_sample > MIN_PER_SAMPLE:
        per_sample, threshold = per_sample // 2, threshold * 4
    return per_sample


@dataclass
class MinMax:
    low: float = math.inf
    high: float = -math.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))

    def merge(self, other: MinMax) -> None:
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)


class Histogram:
    """Signed histogram over [-R, R] with exact re-binning; see the module docstring."""

    def __init__(self, bins: int = DEFAULT_BINS, max_per_sample: int = DEFAULT_MAX_PER_SAMPLE):
        if bins % 2 or bins < 2:
            raise ValueError("bins must be even")
        self.bins, self.max_per_sample = bins, max_per_sample
        self.counts = np.zeros(bins, dtype=np.int64)
        self.radius = 0.0  # 0 until a non-zero value is seen

    def update(self, batch: np.ndarray) -> None:
        """`batch` has a leading sample axis; each sample is subsampled at fixed positions."""
        self.add(subsample(batch, self.max_per_sample))

    def add(self, values: np.ndarray, peak: float | None = None) -> None:
        """Count values already subsampled (`subsample(batch, self.max_per_sample)`, any shape, finite); `peak` is
        their largest magnitude, when the caller has it."""
        values = values.reshape(-1)
        if not values.size:
            return
        if peak is None:
            peak = max(-float(values.min()), float(values.max()))
        self._grow_to(peak)
        if self.radius == 0.0:
            self.counts[self.bins // 2] += values.size  # everything is exactly zero so far
            return
        self._count(values)

    def add_sample(self, values: np.ndarray) -> tuple[float, float]:
        """Count a subsample like `add` and return its minimum and maximum; when a value is NaN or infinite,
        count nothing and return NaN for both. The compiled kernel takes the extremes in the pass that checks
        the values against the range, so an observed tensor's sample is read twice, not four times."""
        values = values.reshape(-1)
        if not values.size:
            return math.inf, -math.inf
        if self._kernel_counts(values):
            low, high, counted = _binning.count(np.ascontiguousarray(values), self._scale(), self.bins // 2,
                                                self.counts)
            if counted:
                return low, high
        elif _binning is not None and values.dtype == np.float32:  # no range yet
            low, high = _binning.extremes(np.ascontiguousarray(values))
        else:
            low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            return math.nan, math.nan
        self.add(values, max(-low, high))
        return low, high

    def _scale(self) -> float:
        return self.bins / (2.0 * self.radius)

    def _kernel_counts(self, values: np.ndarray) -> bool:
        """Whether the compiled kernel can count these values into this histogram (it needs a range)."""
        return (_binning is not None and values.dtype == np.float32 and self.counts.dtype == np.int64
                and self.radius > 0.0 and _float32_exact(self._scale()))

    def _count(self, values: np.ndarray) -> None:
        """Add `values` (|value| < radius) to the counts, with the compiled kernel where it applies."""
        scale = self._scale()
        if self._kernel_counts(values):
            low, high, counted = _binning.count(np.ascontiguousarray(values), scale, self.bins // 2, self.counts)
            if not counted:  # |value| < radius holds by construction; a breach is a bug, not bad input
                raise RuntimeError(f"values in [{low}, {high}] outside the histogram's range {self.radius}")
            return
        self.counts += np.bincount(self._bin_index(values, scale), minlength=self.bins)

    def _bin_index(self, values: np.ndarray, scale: float) -> np.ndarray:
        """floor(value * scale) + B/2, scale = B / 2R. The radius and B are powers of two, so the product is
        exact (in float32 too, unless the scale leaves float32's comfortable range) and so are the floor and the
        integer shift: every value lands in its true bin, and |value| < R keeps the index within [0, B). (The one
        exception: a negative value so tiny against R that its product underflows float32, |value| <= R·2^-161
        at 4096 bins, lands in the zero bin.) Adding R before scaling instead rounds every tiny negative value
        into the zero bin; float32 is ~4x cheaper here. The compiled kernel does the same float32 arithmetic."""
        dtype = np.float32 if values.dtype == np.float32 and _float32_exact(scale) else np.float64
        scaled = np.multiply(values, dtype(scale), dtype=dtype)
        np.floor(scaled, out=scaled)
        scaled += dtype(self.bins // 2)
        return scaled.astype(np.int32 if self.bins < 2**31 else np.int64)

    def _grow_to(self, peak: float) -> None:
        if peak == 0.0 or peak < self.radius:
            return
        # Strictly above the peak, so no value ever sits on the top edge (which re-binning would split).
        self._reach(2.0 ** (math.floor(math.log2(peak)) + 1))

    def _reach(self, target: float) -> None:
        if target <= self.radius:
            return
        if self.radius == 0.0:
            zeros = self.counts.sum()
            self.radius = target
            self.counts[:] = 0
            self.counts[self.bins // 2] = zeros  # zero falls in the bin starting at 0
            return
        while self.radius < target:
            self._double()

    def _double(self) -> None:
        """R -> 2R: bins pair up and the result occupies the middle half of the new range."""
        half = self.bins // 2
        merged = self.counts.reshape(half, 2).sum(axis=1)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.counts[half // 2: half // 2 + half] = merged
        self.radius *= 2.0

    def merge(self, other: Histogram) -> None:
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bin counts")
        peer = other.copy()
        radius = max(self.radius, peer.radius)
        self._reach(radius)
        peer._reach(radius)
        self.counts = self.counts + peer.counts

    def copy(self) -> Histogram:
        out = Histogram(self.bins, self.max_per_sample)
        out.counts, out.radius = self.counts.copy(), self.radius
        return out

    # ------------------------------------------------------------------------------- ranges
    def magnitude(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| (bins of width R/(B/2) from 0) and that bin width."""
        half = self.bins // 2
        mags = self.counts[half:].astype(np.float64) + self.counts[:half][::-1]
        return mags, (self.radius / half if self.radius else 0.0)

    def percentile(self, p: float) -> float:
        mags, width = self.magnitude()
        total = mags.sum()
        if not total or not width:
            return 0.0
        index = int(np.searchsorted(np.cumsum(mags), total * p / 100.0))
        return min(index + 1, len(mags)) * width

    def entropy(self, unsigned: bool = False) -> float:
        mags, width = self.magnitude()
        last = int(np.nonzero(mags)[0][-1]) + 1 if mags.any() else 0
        levels = QUANT_LEVELS * (2 if unsigned else 1)
        if not width or last <= levels:
            return last * width
        mags = mags.copy()
        mags[0] = mags[1]  # the spike of exact zeros (ReLU) would dominate the divergence, as TensorRT notes
        cut = _best_cut(mags, levels, last)
        # KL is degenerate on spiky, discrete distributions; never clip more than 1% of the values.
        return max(cut * width, self.percentile(ENTROPY_FLOOR_PERCENTILE))

    def mse(self, levels: int = 127) -> float:
        """Every bin edge is a candidate; the error of all of them comes from suffix sums in one pass."""
        mags, width = self.magnitude()
        if not mags.any() or not width:
            return 0.0
        last = int(np.nonzero(mags)[0][-1]) + 1
        mags = mags[:last]
        centers = (np.arange(last) + 0.5) * width
        candidates = np.arange(1, last + 1) * width
        # Candidate k (the upper edge of bin k-1) clips exactly bins k and above.
        count, first, second = (_clipped_sums(mags), _clipped_sums(mags * centers), _clipped_sums(mags * centers ** 2))
        clipping = second - 2.0 * candidates * first + candidates ** 2 * count
        rounding = (candidates / levels) ** 2 / 12.0 * (mags.sum() - count)
        return float(candidates[int(np.argmin(clipping + rounding))])


def _float32_exact(scale: float) -> bool:
    """Whether float32 multiplication by this power of two is exact for the values a histogram holds."""
    return 2.0 ** -100 < scale < 2.0 ** 100


def subsample(batch: np.ndarray, max_per_sample: int, grid: bool | None = None) -> np.ndarray:
    """About `max_per_sample` values of each sample (leading axis) at fixed positions, as [batch, k]:
      [N, C, H, W], grid  every channel on a spatial grid of stride `spatial_stride` (the default for rank 4);
      other ranks >= 3    whole rows of the last axis (when a row holds at most max_per_sample values),
                          every ceil(rows / (max_per_sample // row))-th row (row_indices: for [N, C, H, W],
                          one per window at a spread offset where a plain step would line up with the rows of
                          a channel);
      otherwise           the flattened sample at stride ceil(n / max_per_sample).
    ONNX Runtime takes the first two with a strided pooling or gathering that reads a fraction of the tensor;
    a stride over single values touches every cache line of it (ViT, 16384 per sample: the subsample cost
    half a float inference). The calibration graph takes the grid only where ONNX Runtime holds the tensor in
    its blocked conv layout (tap.NCHWC_PRODUCERS) and pools it there; elsewhere (attention scores) rows, which a
    Gather copies whole, where a grid's strided Slice cost the ViT 0.5 ms per tensor and batch."""
    if batch.ndim == 4 and grid is not False:
        stride = spatial_stride(*batch.shape[1:], max_per_sample)
        return batch[:, :, ::stride, ::stride].reshape(batch.shape[0], -1)
    if batch.ndim >= 3 and 0 < batch.shape[-1] <= max_per_sample:
        rows = batch.reshape(batch.shape[0], -1, batch.shape[-1])
        period = batch.shape[2] if batch.ndim == 4 else 1
        taken = row_indices(rows.shape[1], max_per_sample // batch.shape[-1], period)
        return rows[:, taken].reshape(batch.shape[0], -1)
    flat = batch.reshape(batch.shape[0], -1) if batch.ndim > 1 else batch.reshape(-1, 1)
    return flat[:, ::_stride(flat.shape[1], max_per_sample)]


def _stride(count: int, keep: int) -> int:
    return max(1, -(-count // keep))


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def row_indices(count: int, keep: int, period: int = 1) -> np.ndarray:
    """The rows of `count` a subsample takes, about `keep`: every step-th (step = ceil(count / keep)). Rows that
    group `period` to a channel ([N, C, H, W] as C·H rows of W: period H) are where a plain step can line up with
    them: sharing a factor with H it only ever takes H/gcd of each channel's rows (a multiple of H: each channel's
    top row, where zero padding makes the tails heavier; the 512x512 U-Net's up-convolution outputs at step 256
    and 512 gave 99.99th percentiles 8% and 23% under those of every value), and at step >= H it takes about one
    row per channel, creeping down from the top by step mod H. There, one row of each window of `step` rows is
    taken at a golden-ratio offset instead, spread over every row of a channel."""
    step = _stride(count, keep)
    if period <= 1 or step <= 1 or (math.gcd(step, period) == 1 and step < period):
        return np.arange(0, count, step)
    windows = np.arange(-(-count // step))
    rows = windows * step + np.floor(windows * GOLDEN % 1.0 * step).astype(np.int64)
    return rows[rows < count]


def spatial_stride(channels: int, height: int, width: int, max_per_sample: int) -> int:
    """The smallest odd stride s with channels * ceil(height / s) * ceil(width / s) <= max_per_sample, or the
    one that leaves a single position per channel when there are more channels than that. Odd: an upsampled
    tensor (a stride-2 ConvTranspose's output, or the ReLU after it) holds its output phases at alternate
    positions, each from other kernel taps, and an even stride samples one phase only (bench/deconv_bench.py's
    SimpleBaseline-style pose head, its last ReLU over 16 samples: 99.99th percentile 0.284 at stride 4, 0.329
    at 5, 0.344 over every value; its INT8 SQNR with the ConvTransposes kept, together with row_indices:
    `quant-trt` 34.2 -> 48.5 dB (run in ONNX Runtime), percentile with ort-cpu Q/DQ 25.5 -> 44.4)."""
    stride = 1
    while channels * -(-height // stride) * -(-width // stride) > max_per_sample and stride < max(height, width):
        stride += 1
    return stride + 1 if stride % 2 == 0 and stride < max(height, width) else stride


COARSE_CUTS = 64


def _clipped_sums(values: np.ndarray) -> np.ndarray:
    """out[k] = sum(values[k + 1:]): what the candidate at the upper edge of bin k clips."""
    return np.concatenate([np.cumsum(values[::-1])[::-1][1:], [0.0]])


def _best_cut(mags: np.ndarray, levels: int, last: int) -> int:
    """The cut in [levels, last] of least KL divergence (the widest of equal minima), searched coarse to
    fine: about 64 evenly spaced cuts, then every cut (or 64 of them) within one coarse step of the best.
    TensorRT tries every cut; here that would cost ~10 ms per tensor, and the divergence is smooth at the
    coarse step on real activations."""
    divergences = _divergences_of(mags)
    step = max(1, (last - levels) // COARSE_CUTS)
    cuts = np.arange(levels, last + 1, step)
    if cuts[-1] != last:
        cuts = np.append(cuts, last)
    best = _widest_min(cuts, divergences(cuts, levels))
    if step > 1:
        low, high = max(levels, best - step), min(last, best + step)
        # sorted(set()), not np.unique: numpy imports numpy.ma on its first np.unique, 12 ms of every calibration.
        fine = np.array(sorted({*range(low, high + 1, max(1, (high - low) // COARSE_CUTS)), best}), np.int64)
        best = _widest_min(fine, divergences(fine, levels))
    return int(best)


def _widest_min(cuts: np.ndarray, divergences: np.ndarray) -> int:
    return int(cuts[len(cuts) - 1 - int(np.argmin(divergences[::-1]))])


def kl_divergences(mags: np.ndarray, cuts: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for every cut at once. P is the |x| histogram up to the cut with the clipped tail in its
    last bin; Q spreads each of `levels` chunks' mass evenly over the chunk's non-empty unclipped bins, so a
    cut that clips real mass pays for it (as in TensorRT's calibrator).

    Computed per chunk rather than per bin, from prefix sums: with T the total, m the counts and S_j, U_j
    the mass and the non-empty bins of chunk j, every non-empty bin b < cut-1 contributes
    (m_b/T)·log(m_b/T) - (m_b/T)·log(S_j / (U_j·Q)), Q the unclipped mass; the first sums to prefix sums of
    m·log m, the second to S_j·log(S_j / (U_j·Q)) per chunk. Only the last bin, which also holds the tail,
    is handled alone. That is O(levels) per cut instead of O(cut): ~10x cheaper than per bin."""
    return _divergences_of(mags)(np.asarray(cuts, dtype=np.int64), levels)


def _divergences_of(mags: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    """divergences(cuts, levels) on this histogram: the compiled kernel's (the same arithmetic, ~4x faster), or
    numpy's from _PrefixSums. Their sums run in different orders, so the two may differ in the last bits."""
    if _binning is None:
        return _PrefixSums(mags).divergences
    mags = np.ascontiguousarray(mags, dtype=np.float64)

    def divergences(cuts: np.ndarray, levels: int) -> np.ndarray:
        out = np.empty(len(cuts))
        _binning.divergences(mags, np.ascontiguousarray(cuts, dtype=np.int64), levels, out)
        return out

    return divergences


class _PrefixSums:
    """The prefix sums kl_divergences works from, computed once per histogram for both search rounds."""

    def __init__(self, mags: np.ndarray):
        self.mags = np.asarray(mags, dtype=np.float64)
        self.total = float(self.mags.sum())
        nonzero = self.mags > 0
        self.mass = np.concatenate([[0.0], np.cumsum(self.mags)])
        # Counts of non-empty bins, as floats: mixing int64 into the float expressions below cost a cast per use.
        self.filled = np.concatenate([[0.0], np.cumsum(nonzero, dtype=np.float64)])
        mlogm = self.mags * np.log(np.where(nonzero, self.mags, 1.0))
        self.mlogm = np.concatenate([[0.0], np.cumsum(mlogm)])

    def divergences(self, cuts: np.ndarray, levels: int) -> np.ndarray:
        total, mags = self.total, self.mags
        if not total:
            return np.full(len(cuts), math.inf)
        # Chunk j holds bins b with (b * levels) // cut == j, i.e. from ceil(j * cut / levels) up to the next start.
        bounds = (np.arange(levels + 1)[None, :] * cuts[:, None] + levels - 1) // levels
        mass, filled = self.mass[bounds], self.filled[bounds]
        sums, used = mass[:, 1:] - mass[:, :-1], filled[:, 1:] - filled[:, :-1]
        unclipped = self.mass[cuts]
        with np.errstate(divide="ignore", invalid="ignore"):
            # An empty chunk has density 1 (log 0) and weight 0: it adds nothing.
            spread = np.maximum(used, 1.0)
            spread *= unclipped[:, None]
            log_density = np.where(sums > 0, sums, 1.0)
            log_density /= spread
            last = mags[cuts - 1]
            q_last = np.maximum(np.where(last > 0, log_density[:, -1], 0.0), 1e-12)  # the last bin is in the last chunk
            np.log(log_density, out=log_density)
            chunk_terms = np.einsum("ij,ij->i", sums, log_density)
            p_last = (last + total - unclipped) / total
            # Bins below the last one: P log P from prefix sums, minus their share of the chunk terms.
            body = (self.mlogm[cuts - 1] - math.log(total) * self.mass[cuts - 1]) / total
            body -= (chunk_terms - np.where(last > 0, last * log_density[:, -1], 0.0)) / total
            tail = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0) / q_last), 0.0)
            return np.where(unclipped > 0, body + tail, math.inf)
