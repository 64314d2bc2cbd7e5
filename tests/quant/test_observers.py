"""Streaming observers: exact re-binning, batch-size invariance, mergeability, bounded state, methods."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irtool.calibration.observers import Histogram, MinMax


def feed(hist: Histogram, data: np.ndarray, batch: int) -> Histogram:
    for start in range(0, len(data), batch):
        hist.update(data[start:start + batch])
    return hist


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 40), growth=st.floats(0.01, 100.0))
def test_histogram_is_batch_size_invariant(seed, batch, growth):
    rng = np.random.default_rng(seed)
    # Values grow over the samples, so the range doubles several times mid-stream.
    data = (rng.standard_normal((40, 3, 5)) * np.geomspace(1.0, growth, 40)[:, None, None]).astype(np.float32)
    whole = feed(Histogram(256), data, len(data))
    split = feed(Histogram(256), data, batch)
    assert whole.radius == split.radius
    np.testing.assert_array_equal(whole.counts, split.counts)
    assert whole.counts.sum() == data.size


def test_merge_equals_one_observer_over_all_data():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 64)), rng.standard_normal((30, 64)) * 9.0
    merged = feed(Histogram(512), a, 7)
    merged.merge(feed(Histogram(512), b, 5))
    together = feed(Histogram(512), np.concatenate([a, b]), 11)
    assert merged.radius == together.radius == 2.0 ** (np.floor(np.log2(np.abs(b).max())) + 1)
    np.testing.assert_array_equal(merged.counts, together.counts)


def test_state_size_does_not_grow_with_samples():
    hist = Histogram(1024, max_per_sample=100)
    data = np.random.default_rng(1).standard_normal((2000, 10_000)).astype(np.float32)
    feed(hist, data, 250)
    assert hist.counts.shape == (1024,) and hist.counts.nbytes == 8 * 1024
    assert hist.counts.sum() == 2000 * 100  # at most max_per_sample values of each sample


def test_radius_is_smallest_power_of_two_above_the_peak():
    hist = Histogram(64)
    hist.update(np.array([[0.3, -0.7]]))
    assert hist.radius == 1.0
    hist.update(np.array([[4.0]]))
    assert hist.radius == 8.0  # strictly above 4 so no value sits on the top edge
    hist.update(np.zeros((3, 2)))
    assert hist.radius == 8.0 and hist.counts.sum() == 9


def test_range_methods_on_a_gaussian():
    data = np.random.default_rng(2).standard_normal((200, 5000)).astype(np.float32)
    hist = feed(Histogram(), data, 50)
    peak = float(np.abs(data).max())
    assert hist.percentile(99.99) == pytest.approx(np.percentile(np.abs(data), 99.99), abs=0.02)
    assert 2.5 < hist.mse() < peak
    assert 2.5 < hist.entropy() <= peak + hist.radius / 2048
    relu = feed(Histogram(), np.maximum(data, 0), 50)
    assert 2.5 < relu.entropy(unsigned=True) <= peak + relu.radius / 2048  # the zero spike does not collapse it


def test_minmax_merge():
    a, b = MinMax(), MinMax()
    a.update(np.array([1.0, -2.0]))
    b.update(np.array([5.0]))
    a.merge(b)
    assert (a.low, a.high) == (-2.0, 5.0)
