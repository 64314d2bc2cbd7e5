"""Streaming observers: exact re-binning, batch-size invariance, mergeability, bounded state, methods."""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from irtool.calibration import engine, observers
from irtool.calibration.data import CalibrationData
from irtool.calibration.engine import Timings, collect
from irtool.calibration.observers import (
    Histogram,
    MinMax,
    _best_cut,
    kl_divergences,
    spatial_stride,
    subsample,
    values_per_sample,
)
from irtool.ir.model import Model


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


def _exact_counts(values: np.ndarray, bins: int, radius: float) -> np.ndarray:
    """The true bins, in float64 (where v * B / 2R is exact for float32 inputs)."""
    index = np.floor(values.astype(np.float64) * (bins / (2.0 * radius))).astype(np.int64) + bins // 2
    return np.bincount(index, minlength=bins)


def _awkward_values(radius: float, bins: int) -> np.ndarray:
    """Values on bin edges, tiny and subnormal ones, signed zeros and the range's edges (-radius doubles the range
    once), among Gaussians. Negative values whose scaled value underflows float32 at the doubled range are left
    out: both paths count them in the zero bin (observers.Histogram._bin_index)."""
    rng = np.random.default_rng(7)
    width = 2.0 * radius / bins
    edges = np.arange(-bins // 2, bins // 2) * width
    tiny = np.concatenate([[-1e-38, -1e-45, 1e-45, -0.0, 0.0, -width / 3, width / 3],
                           radius * -(2.0 ** -np.arange(1, 170, 7))])
    limits = np.array([-radius, np.nextafter(np.float32(radius), np.float32(0)), np.nextafter(np.float32(-radius), 0)])
    gauss = np.clip(rng.standard_normal(100_003) * radius / 4, -radius, radius * 0.999)
    values = np.concatenate([edges, tiny, limits, gauss, np.maximum(gauss, 0)]).astype(np.float32)
    return values[(values >= 0) | (values.astype(np.float64) / (2 * width) <= -(2.0 ** -149))]


@pytest.mark.parametrize("bins", [256, 4096])
@pytest.mark.parametrize("radius", [2.0 ** -60, 1.0, 8.0, 2.0 ** 41])
def test_compiled_binning_counts_every_value_in_its_true_bin_as_numpy_does(monkeypatch, bins, radius):
    values = _awkward_values(radius, bins)  # the range's lower edge, -radius, makes the histogram double once
    native = Histogram(bins)
    native._reach(radius)
    native.add(values)
    monkeypatch.setattr(observers, "_binning", None)
    plain = Histogram(bins)
    plain._reach(radius)
    plain.add(values)
    assert native.radius == plain.radius == 2 * radius
    np.testing.assert_array_equal(native.counts, _exact_counts(values, bins, native.radius))
    np.testing.assert_array_equal(plain.counts, native.counts)


def test_compiled_binning_is_built_by_the_install():
    # setup.py builds it (optional, so a machine without a C compiler falls back to numpy); the dev/CI install has
    # one, and the benchmark's calibration times assume the kernel.
    assert observers._binning is not None, "irtool/calibration/_binning.c was not built: run `python3 dev.py env`"


def test_compiled_binning_counts_nothing_when_a_value_falls_outside_the_bins():
    kernel = observers._binning
    counts = np.zeros(8, np.int64)
    assert kernel.count(np.array([0.5, 4.0, -0.25], np.float32), 1.0, 4, counts) == (-0.25, 4.0, False)
    assert kernel.count(np.array([0.5, -4.5], np.float32), 1.0, 4, counts) == (-4.5, 0.5, False)
    assert not counts.any()
    assert kernel.count(np.array([0.5, -4.0, 3.99, -0.01], np.float32), 1.0, 4, counts) == pytest.approx(
        (-4.0, 3.99, True))
    np.testing.assert_array_equal(counts, [1, 0, 0, 1, 1, 0, 0, 1])
    with pytest.raises(TypeError, match="float32"):
        kernel.count(np.zeros(3, np.float64), 1.0, 4, counts)
    hist = Histogram(8)
    hist.add(np.array([1.0], np.float32))
    with pytest.raises(RuntimeError, match="outside the histogram's range"):
        hist._count(np.array([3.0], np.float32))  # the caller must grow the radius first


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 64, 95, 1000, 100_003])
def test_compiled_extremes_are_numpys_and_nan_for_a_value_that_is_not_finite(size):
    """The kernel keeps 32 running extremes side by side and a tail: plant the extremes at every kind of position."""
    kernel = observers._binning
    rng = np.random.default_rng(size)
    for position in sorted({0, size // 2, size - 1}) if size else []:
        values = rng.standard_normal(size).astype(np.float32)
        values[position] = 100.0
        assert kernel.extremes(values) == (float(values.min()), 100.0)
        values[position] = -100.0
        assert kernel.extremes(values) == (-100.0, float(values.max()))
        for bad in (np.nan, np.inf, -np.inf):
            values[position] = bad
            low, high = kernel.extremes(values)
            assert np.isnan(low) and np.isnan(high)
            counts = np.zeros(8, np.int64)
            low, high, counted = kernel.count(values, 2.0 ** -10, 4, counts)
            assert np.isnan(low) and np.isnan(high) and not counted and not counts.any()
    if not size:
        assert kernel.extremes(np.zeros(0, np.float32)) == (np.inf, -np.inf)


@pytest.mark.parametrize("compiled", [True, False])
def test_add_sample_counts_and_returns_the_extremes_or_nan_without_counting(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(observers, "_binning", None)
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((4, 300)).astype(np.float32) * scale for scale in (0.1, 1.0, 30.0, 2.0)]
    hist, reference = Histogram(256), Histogram(256)
    for batch in batches:  # the range grows twice, from zero
        assert hist.add_sample(batch) == (float(batch.min()), float(batch.max()))
        reference.update(batch)
    np.testing.assert_array_equal(hist.counts, reference.counts)
    assert hist.radius == reference.radius
    poisoned = batches[0].copy()
    poisoned[2, 7] = np.nan
    assert all(np.isnan(hist.add_sample(poisoned)))
    np.testing.assert_array_equal(hist.counts, reference.counts)
    assert hist.add_sample(np.zeros((0, 5), np.float32)) == (np.inf, -np.inf)


def test_minmax_merge():
    a, b = MinMax(), MinMax()
    a.update(np.array([1.0, -2.0]))
    b.update(np.array([5.0]))
    a.merge(b)
    assert (a.low, a.high) == (-2.0, 5.0)


def _kl_reference(mags: np.ndarray, cut: int, levels: int) -> float:
    """TensorRT's divergence for one cut, written plainly (the vectorized version must agree)."""
    kept = mags[:cut]
    p = kept.copy()
    p[-1] += mags[cut:].sum()
    chunk = (np.arange(cut) * levels) // cut
    nonzero = kept > 0
    sums = np.bincount(chunk, weights=kept, minlength=levels)
    used = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, sums[chunk] / np.maximum(used[chunk], 1.0), 0.0)
    if not p.sum() or not q.sum():
        return np.inf
    mask = p > 0
    p, q = p[mask] / p.sum(), np.maximum(q[mask] / q.sum(), 1e-12)
    return float(np.sum(p * np.log(p / q)))


@pytest.mark.parametrize("seed", range(4))
def test_vectorized_kl_matches_the_plain_divergence(seed):
    rng = np.random.default_rng(seed)
    mags = np.floor(rng.exponential(50.0, 700) * (rng.random(700) > 0.2))  # empty bins included
    cuts = np.array([128, 129, 200, 333, 512, 699, 700])
    got = kl_divergences(mags, cuts, 128)
    want = [_kl_reference(mags, int(c), 128) for c in cuts]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_kl_matches_numpys_and_picks_the_same_cut(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    mags = np.floor(rng.exponential(50.0, 2048) * (rng.random(2048) > 0.2) * np.linspace(3, 0, 2048) ** 2)
    last = int(np.nonzero(mags)[0][-1]) + 1
    cuts = np.arange(128, last + 1)
    compiled, searched = kl_divergences(mags, cuts, 128), _best_cut(mags, 128, last)
    monkeypatch.setattr(observers, "_binning", None)
    assert compiled == pytest.approx(kl_divergences(mags, cuts, 128), rel=1e-9)
    assert searched == _best_cut(mags, 128, last)
    assert kl_divergences(np.zeros(300), [128, 300], 128).tolist() == [np.inf, np.inf]


def test_compiled_kl_refuses_cuts_outside_the_histogram():
    out = np.empty(1)
    for cut in (127, 301):
        with pytest.raises(ValueError, match="outside"):
            observers._binning.divergences(np.ones(300), np.array([cut], np.int64), 128, out)


def test_entropy_coarse_to_fine_search_finds_the_exhaustive_minimum_on_a_laplacian():
    data = np.random.default_rng(5).laplace(size=(100, 20000)).astype(np.float32)
    hist = feed(Histogram(), data, 25)
    mags, width = hist.magnitude()
    last = int(np.nonzero(mags)[0][-1]) + 1
    mags = mags.copy()
    mags[0] = mags[1]
    cuts = np.arange(128, last + 1)
    exhaustive = cuts[int(np.argmin([_kl_reference(mags, int(c), 128) for c in cuts]))]
    searched = _best_cut(mags, 128, last)
    # The divergence is jagged from cut to cut (neighbours differ by up to 2x here), so the search may land
    # on a different cut of nearly the same divergence, never far from the exhaustive one.
    assert abs(searched - exhaustive) <= 0.1 * exhaustive
    assert kl_divergences(mags, [searched], 128)[0] <= kl_divergences(mags, [exhaustive], 128)[0] * 1.05


def test_mse_threshold_minimizes_the_brute_force_error():
    data = np.random.default_rng(6).standard_normal((50, 4000)).astype(np.float32)
    hist = feed(Histogram(), data, 10)
    mags, width = hist.magnitude()
    centers = (np.arange(len(mags)) + 0.5) * width

    def error(t):
        return float(np.sum(mags * np.where(centers > t, (centers - t) ** 2, (t / 127) ** 2 / 12.0)))

    last = int(np.nonzero(mags)[0][-1]) + 1
    brute = min((k * width for k in range(1, last + 1)), key=error)
    assert hist.mse() == pytest.approx(brute)


def test_values_per_sample_halve_as_the_set_quadruples_down_to_a_floor():
    assert [values_per_sample(n) for n in (None, 1, 64, 255, 256, 1023, 1024, 4095, 10**6)] == [
        16384, 16384, 16384, 16384, 8192, 8192, 4096, 4096, 4096]


@pytest.mark.parametrize("samples, per_sample", [(64, 16384), (256, 8192)])
def test_engine_sizes_the_subsample_by_the_set_and_stays_batch_size_invariant(samples, per_sample):
    """x and y hold 16384 values per sample (4 x 64 x 64); the graph input x is sampled by whole rows of 64 (all
    of them at 64 samples, one of every two from 256 samples on), the Relu output y on a grid (stride 1, then 3:
    an odd stride, spatial_stride); batches of 16 and of 40 give the same histograms."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 64, 64])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    data = list(np.random.default_rng(7).standard_normal((samples, 4, 64, 64)).astype(np.float32))
    runs = [collect(model, ["x", "y"], CalibrationData.from_iterable(data, [("x", np.float32, ["n", 4, 64, 64])],
                                                                     batch_size=batch), histograms=True)
            for batch in (16, 40)]
    one = np.zeros((1, 4, 64, 64), np.float32)
    expected = {"x": subsample(one, per_sample, grid=False).size, "y": subsample(one, per_sample, grid=True).size}
    assert expected == {"x": per_sample, "y": 16384 if per_sample == 16384 else 4 * 22 * 22}
    for name in ("x", "y"):
        assert runs[0][name].histogram.counts.sum() == samples * expected[name]
        np.testing.assert_array_equal(runs[0][name].histogram.counts, runs[1][name].histogram.counts)


def test_engine_books_reading_the_data_apart_from_inference():
    """A source that takes 0.1 s per batch: those 0.3 s are `data`, not `inference` (three runs of one Relu)."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    batches = [{"x": np.random.default_rng(i).standard_normal((4, 4, 8, 8)).astype(np.float32)} for i in range(3)]

    def slow():
        for batch in batches:
            time.sleep(0.1)
            yield batch

    timings = Timings()
    collect(model, ["x", "y"], slow, histograms=True, timings=timings)
    assert timings.data >= 0.3
    assert 0.0 <= timings.inference < 0.3
    assert timings.session > 0.0 and timings.observe > 0.0
    assert timings.search == 0.0  # the calibrate pass's, not the engine's
    assert list(timings.as_dict()) == ["data", "session", "inference", "observe", "search"]


def test_engine_frees_each_batch_of_samples_before_the_next_batch_runs(monkeypatch):
    """Peak memory holds one batch of samples, not two (the ViT of bench/quant_bench.py: 851 -> 578 MB at 64
    samples): when the source is asked for batch k + 1, nothing refers to batch k's samples any more."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    seen: list[weakref.ref] = []
    add_sample = Histogram.add_sample

    def recording_add(self, values):
        root = values
        while isinstance(root.base, np.ndarray):
            root = root.base
        seen.append(weakref.ref(root))
        return add_sample(self, values)

    monkeypatch.setattr(Histogram, "add_sample", recording_add)
    alive_when_asked = []

    def source():
        for i in range(3):
            alive_when_asked.append(sum(ref() is not None for ref in seen))
            yield {"x": np.random.default_rng(i).standard_normal((4, 4, 8, 8)).astype(np.float32)}

    collect(model, ["y"], source, histograms=True)
    assert len(seen) == 3  # one sample of y per batch
    assert alive_when_asked == [0, 0, 0]


def test_engine_bins_tensors_on_several_threads_with_the_counts_of_one(monkeypatch):
    """engine.Binning spreads a batch's tensors over threads; every histogram and range equals the one-thread
    run's, bit for bit, whatever the number of threads (each histogram is counted by one thread)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "r"], ["a"]),
             helper.make_node("Tanh", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32, 32])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    data = list(np.random.default_rng(3).standard_normal((40, 3, 32, 32)).astype(np.float32) * 3.0)
    source = CalibrationData.from_iterable(data, [("x", np.float32, ["n", 3, 32, 32])], batch_size=16)
    names = ["x", "r", "s", "m", "a", "y"]
    runs, threads = {}, []
    original = engine.Binning.__init__

    def recording_init(self, workers):
        original(self, workers)
        threads.append(1 if self._pool is None else self._pool._max_workers + 1)

    monkeypatch.setattr(engine.Binning, "__init__", recording_init)
    for workers in (1, 2, 3):
        monkeypatch.setattr(engine, "binning_workers", lambda workers=workers: workers)
        runs[workers] = collect(model, names, source, histograms=True)
    assert threads == [1, 2, 3]
    for workers in (2, 3):
        for name in names:
            np.testing.assert_array_equal(runs[workers][name].histogram.counts, runs[1][name].histogram.counts)
            assert runs[workers][name].histogram.radius == runs[1][name].histogram.radius
            assert runs[workers][name].minmax == runs[1][name].minmax
    assert runs[1]["r"].minmax.low == 0.0 and runs[1]["x"].minmax.low < -5.0
    assert runs[1]["s"].histogram.counts.sum() == 40 * 3 * 32 * 32


def test_balanced_shares_split_the_values_evenly_and_cover_every_job():
    sizes = [16384, 12, 4096, 4096, 8192, 0, 16384, 100]
    jobs = [(None, type("S", (), {"sample": np.zeros(n, np.float32) if n else None})()) for n in sizes]
    shares = engine._balanced(jobs, 2)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 100


def test_an_even_stride_never_samples_one_phase_of_an_upsampled_tensor():
    """An upsampled map holds its output phases at alternate positions: a grid of even stride takes one phase, and a
    row step that is a multiple of H each channel's top row. Here phase (0, 0) is 0 and the others 1..3, and every
    row is its index: the grid (stride 5, not 4) and the rows (spread, not every 64th) see every phase and row."""
    phases = np.arange(4, dtype=np.float32).reshape(2, 2)
    upsampled = np.tile(phases, (16, 16))[None, None].repeat(64, axis=1)  # [1, 64, 32, 32]
    grid = subsample(upsampled, 16384 // 4, grid=True)
    assert set(np.unique(grid)) == {0.0, 1.0, 2.0, 3.0}
    rows = np.broadcast_to(np.arange(64, dtype=np.float32)[None, None, :, None], (1, 64, 64, 8))
    taken = subsample(np.ascontiguousarray(rows), 64 * 8, grid=False)  # 64 of 4096 rows
    assert len(np.unique(taken)) > 48 and taken.min() < 8 and taken.max() > 56
    assert spatial_stride(64, 32, 32, 4096) == 5 and spatial_stride(64, 32, 32, 16384) == 3  # 4 and 2 would fit
    assert spatial_stride(1, 32, 32, 4096) == 1 and spatial_stride(64, 27, 27, 16384) == 3
