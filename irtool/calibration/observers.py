"""Streaming activation statistics whose state does not grow with the number of samples.

MinMax     running min and max.
Histogram  a fixed number of bins B over [-R, R], where R is always the smallest power of two strictly
           above every |value| seen so far. When a batch exceeds R, R doubles (as often as needed) and
           each pair of neighbouring bins merges into one, which is exact: a value's bin at 2R is the
           merge of its bin at R. Hence the final histogram depends only on the set of values, never
           on batch boundaries or order, and two observers merge exactly (bring both to the larger R,
           add). Each sample contributes at most `max_per_sample` values, taken at fixed strided
           positions of that sample, so the subsample too is independent of how samples are batched.

Range methods on a histogram (all return a symmetric threshold T on |x|, then clipped to min/max):
  percentile  the p-th percentile of |x|
  entropy     TensorRT's KL-divergence calibration: for each candidate T, P = the |x| histogram up to
              T with the clipped tail folded into the last bin, Q = P quantized to 128 levels and
              expanded back (empty bins stay empty); pick the T minimizing KL(P || Q). As in NVIDIA's
              implementation the zero bin is replaced by its neighbour (ReLU's zeros would dominate),
              and, because KL is degenerate on spiky discrete data, T is never below the 99th
              percentile of |x|
  mse         the T minimizing the expected squared error of int8 quantization: clipping error
              Σ_{|x|>T} (|x|−T)² plus rounding error Δ²/12 per unclipped value, Δ = T/127
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 4096
DEFAULT_MAX_PER_SAMPLE = 1 << 16
QUANT_LEVELS = 128
ENTROPY_FLOOR_PERCENTILE = 99.0


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

    def add(self, values: np.ndarray) -> None:
        """Count values already subsampled (`subsample(batch, self.max_per_sample)`, any shape)."""
        values = values.reshape(-1)
        if not values.size:
            return
        peak = float(np.max(np.abs(values)))
        self._grow_to(peak)
        if self.radius == 0.0:
            self.counts[self.bins // 2] += values.size  # everything is exactly zero so far
            return
        scale = self.bins / (2.0 * self.radius)
        index = np.floor((values.astype(np.float64) + self.radius) * scale).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

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
        step = max(1, (last - levels) // 512)
        candidates = list(range(levels, last + 1, step))
        if candidates[-1] != last:
            candidates.append(last)
        divergences = np.array([_kl_divergence(mags, i, levels) for i in candidates])
        best = len(divergences) - 1 - int(np.argmin(divergences[::-1]))  # the widest of equal minima
        # KL is degenerate on spiky, discrete distributions; never clip more than 1% of the values.
        return max(candidates[best] * width, self.percentile(ENTROPY_FLOOR_PERCENTILE))

    def mse(self, levels: int = 127) -> float:
        mags, width = self.magnitude()
        if not mags.any() or not width:
            return 0.0
        centers = (np.arange(len(mags)) + 0.5) * width
        last = int(np.nonzero(mags)[0][-1]) + 1
        candidates = np.linspace(width, last * width, num=min(last, 512))
        errors = [float(np.sum(mags * np.where(centers > t, (centers - t) ** 2, (t / levels) ** 2 / 12.0)))
                  for t in candidates]
        return float(candidates[int(np.argmin(errors))])


def subsample(batch: np.ndarray, max_per_sample: int) -> np.ndarray:
    """At most `max_per_sample` values of each sample (leading axis), at fixed strided positions: [batch, k]."""
    flat = batch.reshape(batch.shape[0], -1) if batch.ndim > 1 else batch.reshape(-1, 1)
    stride = max(1, -(-flat.shape[1] // max_per_sample))
    return flat[:, ::stride]


def _kl_divergence(mags: np.ndarray, cut: int, levels: int) -> float:
    # P carries the clipped tail in its last bin; Q is built from the unclipped bins only, so a cut
    # that clips real mass pays for it (as in TensorRT's calibrator).
    kept = mags[:cut]
    p = kept.copy()
    p[-1] += mags[cut:].sum()
    chunk = (np.arange(cut) * levels) // cut
    nonzero = kept > 0
    sums = np.bincount(chunk, weights=kept, minlength=levels)
    used = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, sums[chunk] / np.maximum(used[chunk], 1.0), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if not p_sum or not q_sum:
        return math.inf
    mask = p > 0
    p, q = p[mask] / p_sum, np.maximum(q[mask] / q_sum, 1e-12)
    return float(np.sum(p * np.log(p / q)))
