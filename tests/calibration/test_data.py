"""CalibrationData: every source format, selection, batching, validation, random data, fingerprints."""

from __future__ import annotations

import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from irtool.calibration.data import (
    DEFAULT_BATCH_SIZE,
    MAX_OPEN_BATCHES,
    CalibrationData,
    ModelInput,
    as_calibration_data,
    model_inputs,
    select_indices,
)
from irtool.errors import InputError
from irtool.ir.model import Model
from tests.calibration.models import F32, I64, ONE, TWO, concat, samples
from tests.cli.models import tiny_model


def two_input_arrays(n: int) -> dict[str, np.ndarray]:
    return {"a": samples(n, (2,), dtype=np.float64), "b": np.arange(n * 3, dtype=np.int64).reshape(n, 3)}


# ----------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_file_gives_every_sample_cast_to_the_model_dtypes(tmp_path: Path, save):
    arrays = two_input_arrays(5)
    save(tmp_path / "d.npz", **arrays)
    data = CalibrationData.from_path(tmp_path / "d.npz", TWO, batch_size=2)
    assert data.num_samples == 5 and data.batch_size == 2 and data.num_batches == 3
    got = concat(data)
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
    np.testing.assert_array_equal(got["a"], arrays["a"].astype(np.float32))
    np.testing.assert_array_equal(got["b"], arrays["b"])
    assert [b["a"].shape[0] for b in data()] == [2, 2, 1]



def test_a_sample_shaped_unlike_its_batch_starts_a_new_batch():
    """Text padded per batch: items of 5 samples at 12 tokens, then 5 at 18. With batches of 4 the third
    batch would mix lengths, so it ends after the first item's last sample; where a model fixes the batch,
    mixing stays an error that says so."""
    tokens = [("ids", I64, (None, None))]
    items = [{"ids": np.full((5, 12), 1, np.int64)}, {"ids": np.full((5, 18), 2, np.int64)}]
    data = CalibrationData.from_iterable(items, tokens, batch_size=4)
    assert [b["ids"].shape for b in data()] == [(4, 12), (1, 12), (4, 18), (1, 18)]
    fixed = CalibrationData.from_iterable(items, [("ids", I64, (2, None))], batch_size=4)
    with pytest.raises(InputError, match=r"sample 5 \(item 1\) has shape \(18,\).*fixes the batch to 2"):
        list(fixed())


def test_npz_file_of_a_single_input_model_may_use_any_key(tmp_path: Path):
    x = samples(3)
    np.savez(tmp_path / "d.npz", images=x)
    np.testing.assert_array_equal(concat(CalibrationData.from_path(tmp_path / "d.npz", ONE))["x"], x)


def test_npy_folder_reads_single_samples_and_stacks_in_sorted_path_order(tmp_path: Path):
    x = samples(6)
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "a.npy", x[0])  # one sample (rank of the input minus the batch axis)
    np.save(tmp_path / "b.npy", x[1:4])  # a stack of three
    np.save(tmp_path / "sub" / "c.npy", x[4:6].astype(np.float64))  # cast to float32
    (tmp_path / "README.txt").write_text("ignored")
    np.save(tmp_path / ".hidden.npy", samples(1, start=99))  # hidden files are skipped
    data = CalibrationData.from_path(tmp_path, ONE, batch_size=4)
    assert data.num_samples == 6
    np.testing.assert_array_equal(concat(data)["x"], x)


def test_npz_folder_holds_samples_keyed_by_input_name(tmp_path: Path):
    arrays = two_input_arrays(4)
    np.savez(tmp_path / "0.npz", a=arrays["a"][0], b=arrays["b"][0])
    np.savez_compressed(tmp_path / "1.npz", a=arrays["a"][1:], b=arrays["b"][1:])
    got = concat(CalibrationData.from_path(tmp_path, TWO, batch_size=3))
    np.testing.assert_array_equal(got["a"], arrays["a"].astype(np.float32))
    np.testing.assert_array_equal(got["b"], arrays["b"])


def test_a_single_npy_file_is_a_source_too(tmp_path: Path):
    x = samples(3)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(concat(CalibrationData.from_path(tmp_path / "x.npy", ONE))["x"], x)


def test_iterables_of_per_sample_and_batched_dicts(tmp_path: Path):
    x = samples(5)
    per_sample = [{"x": s} for s in x]
    batched = [{"x": x[:2]}, {"x": x[2:]}]
    for source in (per_sample, batched, lambda: iter(batched), {"x": x}, x):
        data = CalibrationData.from_iterable(source, ONE, batch_size=3)
        assert data.num_samples == 5
        np.testing.assert_array_equal(concat(data)["x"], x)
        np.testing.assert_array_equal(concat(data)["x"], x)  # re-iterable


def test_a_one_shot_iterator_is_refused():
    with pytest.raises(InputError, match="one-shot iterator"):
        CalibrationData.from_iterable(({"x": s} for s in samples(2)), ONE)


def test_an_iterable_that_changes_between_reads_is_an_error():
    calls = []

    def provider():
        calls.append(1)
        return iter([{"x": samples(3 if len(calls) == 1 else 2)}])

    data = CalibrationData.from_iterable(provider, ONE)
    with pytest.raises(InputError, match="yielded 2 samples, 3 the first time"):
        list(data())


# ----------------------------------------------------------------------------------- selection and batching
def test_selection_is_seeded_sorted_and_without_replacement():
    first, again, other = (select_indices(100, 10, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for chosen in (first, other):
        assert len(set(chosen.tolist())) == 10 and list(chosen) == sorted(chosen) and chosen.max() < 100


@pytest.mark.parametrize("batch_size", [1, 3, 7, 16])
def test_batches_concatenate_to_exactly_the_selected_samples(tmp_path: Path, batch_size: int):
    x = samples(20)
    np.savez_compressed(tmp_path / "d.npz", x=x)
    data = CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=7, seed=3, batch_size=batch_size)
    np.testing.assert_array_equal(data.indices, select_indices(20, 7, 3))
    np.testing.assert_array_equal(concat(data)["x"], x[data.indices])
    sizes = [b["x"].shape[0] for b in data()]
    assert sum(sizes) == 7 and all(s == batch_size for s in sizes[:-1])


def test_selection_spans_files_of_a_folder(tmp_path: Path):
    x = samples(12)
    for k in range(4):
        np.save(tmp_path / f"{k}.npy", x[3 * k:3 * k + 3])
    data = CalibrationData.from_path(tmp_path, ONE, samples=5, seed=7, batch_size=2)
    np.testing.assert_array_equal(concat(data)["x"], x[select_indices(12, 5, 7)])


def test_more_samples_than_available_clamps_with_a_warning(tmp_path: Path, caplog):
    np.savez(tmp_path / "d.npz", x=samples(3))
    with caplog.at_level(logging.WARNING, logger="irtool"):
        data = CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=10)
    assert data.num_samples == 3
    assert any("holds 3 samples, fewer than the 10" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("samples_, batch", [(0, 16), (None, 0)])
def test_non_positive_samples_or_batch_size_are_errors(tmp_path: Path, samples_, batch):
    np.savez(tmp_path / "d.npz", x=samples(3))
    with pytest.raises(InputError, match="must be at least 1"):
        CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=samples_, batch_size=batch)


def test_a_static_batch_dim_in_the_model_fixes_the_batch_size():
    fixed = [("x", F32, (1, 3, 4, 4))]
    data = CalibrationData.from_iterable([{"x": samples(3)}], fixed, batch_size=16)
    assert data.batch_size == 1 and [b["x"].shape for b in data()] == [(1, 3, 4, 4)] * 3
    with pytest.raises(InputError, match="fix the batch to 2.*3 calibration samples"):
        CalibrationData.from_iterable([{"x": samples(3)}], [("x", F32, (2, 3, 4, 4))])


def test_samples_of_different_shapes_never_share_a_batch():
    dynamic = [("x", F32, (None, 3, None))]
    items = [{"x": np.zeros((3, 4), np.float32)}, {"x": np.zeros((3, 5), np.float32)}]
    for size in (1, 2):
        assert [b["x"].shape for b in CalibrationData.from_iterable(items, dynamic, batch_size=size)()] == [
            (1, 3, 4), (1, 3, 5)]


SCALAR_T = [("x", F32, (None, 2)), ("t", I64, ())]  # a diffusion UNet's image and timestep


def test_a_scalar_input_is_fed_once_per_batch_of_samples_that_share_its_value(tmp_path: Path):
    """A rank-0 input has no batch axis: an .npz stacks it as [N], and a batch holds only samples with one
    value of it, which the batch feeds as a 0-d array."""
    np.savez(tmp_path / "d.npz", x=samples(5, (2,)), t=np.array([5, 5, 5, 7, 7]))
    data = CalibrationData.from_path(tmp_path / "d.npz", SCALAR_T, batch_size=4)
    got = [(b["x"].shape, b["t"].shape, int(b["t"])) for b in data()]
    assert got == [((3, 2), (), 5), ((2, 2), (), 7)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in data()]), samples(5, (2,)))


def test_a_batched_item_gives_its_scalar_input_once_for_all_its_samples():
    items = [{"x": samples(3, (2,)), "t": np.array(9)}, {"x": samples(1, (2,), start=3)[0], "t": np.array(9)},
             {"x": samples(2, (2,), start=4), "t": np.array([1, 2])}]
    data = CalibrationData.from_iterable(items, SCALAR_T, batch_size=8)
    assert [(b["x"].shape[0], int(b["t"])) for b in data()] == [(4, 9), (1, 1), (1, 2)]
    with pytest.raises(InputError, match=r"different numbers of samples \('x': 3, 't': 2\)"):
        list(CalibrationData.from_iterable([{"x": samples(3, (2,)), "t": np.array([1, 2])}], SCALAR_T)())


def test_samples_are_grouped_by_their_scalar_value_in_a_bounded_number_of_open_batches():
    """Timesteps drawn per sample (1, 2, 1, 2, ...) still fill whole batches, one open batch per value; at most
    MAX_OPEN_BATCHES are held, so six values cycling run one sample per batch (the oldest goes first)."""
    def batches(values, size):
        items = [{"x": samples(1, (2,), start=i)[0], "t": np.array(v)} for i, v in enumerate(values)]
        return [(b["x"].shape[0], int(b["t"]), b["x"][:, 0].astype(int).tolist())
                for b in CalibrationData.from_iterable(items, SCALAR_T, batch_size=size)()]

    assert batches([1, 2] * 6, 4) == [(4, 1, [0, 2, 4, 6]), (4, 2, [1, 3, 5, 7]), (2, 1, [8, 10]), (2, 2, [9, 11])]
    assert MAX_OPEN_BATCHES == 4
    cycled = batches(list(range(6)) * 2, 2)
    assert [(n, t) for n, t, _ in cycled] == [(1, t) for t in [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]


def test_a_model_of_scalar_inputs_alone_runs_each_sample_by_itself():
    data = CalibrationData.from_iterable([{"s": np.arange(3.0)}], [("s", F32, ())], batch_size=16)
    assert data.batch_size == 1 and [float(b["s"]) for b in data()] == [0.0, 1.0, 2.0]


def test_where_the_model_fixes_the_batch_its_samples_must_share_a_scalar_input():
    items = [{"x": samples(2, (2,)), "t": np.array([1, 2])}]
    with pytest.raises(InputError, match=r"input 't': sample 1 .* has the value 2, other samples in its batch 1"):
        list(CalibrationData.from_iterable(items, [("x", F32, (2, 2)), ("t", I64, ())])())


# ----------------------------------------------------------------------------------- validation
def test_a_missing_input_is_named(tmp_path: Path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match=r"input 'b': missing from file d.npz"):
        CalibrationData.from_path(tmp_path / "d.npz", TWO)


def test_an_extra_key_is_named(tmp_path: Path):
    np.savez(tmp_path / "d.npz", **two_input_arrays(2), c=np.zeros((2, 1)))
    with pytest.raises(InputError, match=r"holds 'c', which the model has no input for"):
        CalibrationData.from_path(tmp_path / "d.npz", TWO)


@pytest.mark.parametrize("shape, fragment", [
    ((2, 3, 4, 5), r"sample shape \(3, 4, 5\), the model wants \(3, 4, 4\)"),
    ((2, 2, 3, 4, 4), r"shape \(2, 2, 3, 4, 4\); expected \(\?, 3, 4, 4\)"),
])
def test_wrong_shapes_are_named_with_the_file(tmp_path: Path, shape, fragment):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match=r"input 'x': file bad.npy .*" + fragment):
        CalibrationData.from_path(tmp_path, ONE)


@pytest.mark.parametrize("name, array, fragment", [
    ("a", np.zeros((2, 2), np.int32), "dtype int32, the model wants float32; refusing to cast"),
    ("b", np.zeros((2, 3), np.float32), "dtype float32, the model wants int64"),
])
def test_uncastable_dtypes_are_refused(tmp_path: Path, name, array, fragment):
    arrays = two_input_arrays(2)
    arrays[name] = array
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=f"input '{name}': .*{fragment}"):
        CalibrationData.from_path(tmp_path / "d.npz", TWO)


def test_int_data_is_accepted_when_the_model_wants_ints_and_the_values_fit():
    data = CalibrationData.from_iterable([{"a": np.ones((1, 2), np.float16), "b": np.ones((1, 3), np.int32)}], TWO)
    batch = next(data())
    assert batch["a"].dtype == F32 and batch["b"].dtype == I64
    narrow = [("b", np.dtype(np.int32), (None, 1))]
    with pytest.raises(InputError, match="input 'b': sample 0 .*outside the range of int32"):
        CalibrationData.from_iterable([{"b": np.array([[2**40]])}], narrow)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_name_the_input_and_the_sample(tmp_path: Path, bad):
    x = samples(5)
    x[3, 0, 1, 1] = bad
    np.savez(tmp_path / "d.npz", x=x)
    data = CalibrationData.from_path(tmp_path / "d.npz", ONE, batch_size=2)
    with pytest.raises(InputError, match=r"input 'x': sample 3 \(file d.npz\) holds NaN or Inf"):
        list(data())
    with pytest.raises(InputError, match=r"input 'x': sample 3 \(item 0\) holds NaN or Inf"):
        CalibrationData.from_iterable([{"x": x}], ONE)


def test_float64_values_that_overflow_float32_count_as_inf():
    with pytest.raises(InputError, match="holds NaN or Inf"):
        CalibrationData.from_iterable([{"x": np.full((1, 3, 4, 4), 1e300)}], ONE)


def test_empty_sources_are_errors(tmp_path: Path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="empty.npz holds no samples"):
        CalibrationData.from_path(tmp_path / "empty.npz", ONE)
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="the folder holds no .npy, .npz or image files"):
        CalibrationData.from_path(tmp_path / "folder", ONE)
    with pytest.raises(InputError, match="iterable holds no samples"):
        CalibrationData.from_iterable([], ONE)
    with pytest.raises(InputError, match="no such file or folder"):
        CalibrationData.from_path(tmp_path / "missing", ONE)


def test_unusable_folders_and_files_are_errors(tmp_path: Path):
    np.save(tmp_path / "a.npy", samples(1)[0])
    np.savez(tmp_path / "b.npz", x=samples(1))
    with pytest.raises(InputError, match="mixes npy, npz files"):
        CalibrationData.from_path(tmp_path, ONE)
    with pytest.raises(InputError, match="a folder of .npy files fits only single-input models"):
        CalibrationData.from_path(tmp_path / "a.npy", TWO)
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="c.npz is not a readable .npz"):
        CalibrationData.from_path(tmp_path / "c.npz", ONE)
    np.save(tmp_path / "o.npy", np.array([object()] * 2, dtype=object))
    with pytest.raises(InputError, match="holds Python objects"):
        CalibrationData.from_path(tmp_path / "o.npy", [("x", F32, None)])


def test_a_truncated_file_is_an_input_error_naming_it(tmp_path: Path):
    np.save(tmp_path / "t.npy", samples(4))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
    source = CalibrationData.from_path(tmp_path, ONE)  # the header alone looks fine
    with pytest.raises(InputError, match="t.npy cannot be read"):
        list(source())


def test_inputs_with_different_sample_counts_in_one_file(tmp_path: Path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 2), np.float32), b=np.zeros((3, 3), np.int64))
    with pytest.raises(InputError, match=r"inputs hold different numbers of samples \('a': 2, 'b': 3\)"):
        CalibrationData.from_path(tmp_path / "d.npz", TWO)


# ----------------------------------------------------------------------------------- random data
def test_random_data_only_on_request_and_with_a_warning(caplog):
    model = Model.from_proto(tiny_model())
    assert as_calibration_data(None, model) is None
    with caplog.at_level(logging.WARNING, logger="irtool"):
        data = as_calibration_data("random", model, samples=5, seed=1, batch_size=2)
    assert any(r.levelno == logging.WARNING and "random samples" in r.getMessage() for r in caplog.records)
    got = concat(data)["x"]
    assert got.shape == (5, 3, 8, 8) and got.dtype == F32
    np.testing.assert_array_equal(got, concat(CalibrationData.random(data.inputs, 5, seed=1, batch_size=5))["x"])
    assert not np.array_equal(got, concat(CalibrationData.random(data.inputs, 5, seed=2))["x"])


def test_random_data_needs_static_sample_dims():
    with pytest.raises(InputError, match="input 'x': random calibration data needs a static shape"):
        CalibrationData.random([("x", F32, (None, 3, None))], 2)


# ----------------------------------------------------------------------------------- fingerprints
def test_fingerprint_is_stable_for_the_same_data_and_selection(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=samples(10))
    one = CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=4, seed=0)
    two = CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=4, seed=0, batch_size=3)
    other_seed = CalibrationData.from_path(tmp_path / "d.npz", ONE, samples=4, seed=1)
    assert one.fingerprint() == two.fingerprint()
    assert len(one.fingerprint()) == 40 and int(one.fingerprint(), 16) >= 0
    assert other_seed.fingerprint() != one.fingerprint()


def test_fingerprint_changes_when_a_file_changes_even_at_the_same_size_and_mtime(tmp_path: Path):
    for k in range(3):
        np.save(tmp_path / f"{k}.npy", samples(2, start=10 * k))
    before = CalibrationData.from_path(tmp_path, ONE).fingerprint()
    path = tmp_path / "1.npy"
    stat = path.stat()
    changed = samples(2, start=10)
    changed[1, 0, 0, 0] += 1
    np.save(path, changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert CalibrationData.from_path(tmp_path, ONE).fingerprint() != before


def test_iterable_fingerprint_follows_the_values():
    x = samples(4)
    same = [CalibrationData.from_iterable([{"x": x}], ONE).fingerprint() for _ in range(2)]
    y = x.copy()
    y[2, 0, 0, 0] = -1
    assert same[0] == same[1] != CalibrationData.from_iterable([{"x": y}], ONE).fingerprint()


# ----------------------------------------------------------------------------------- model inputs and memory
def test_model_inputs_reads_names_dtypes_and_symbolic_dims():
    model = Model.from_proto(tiny_model())
    assert model_inputs(model) == [ModelInput("x", F32, (None, 3, 8, 8))]
    # --input-shape fills symbolic dims except the batch axis, which stays free for batching
    assert model_inputs(model, {"x": [1, 3, 8, 8]}) == [ModelInput("x", F32, (None, 3, 8, 8))]
    assert DEFAULT_BATCH_SIZE == 16


def test_an_npz_member_is_streamed_row_by_row(tmp_path: Path):
    x = np.random.default_rng(0).standard_normal((64, 3, 128, 128)).astype(np.float32)  # 12.6 MB
    np.savez_compressed(tmp_path / "big.npz", x=x)
    inputs = [("x", F32, (None, 3, 128, 128))]
    data = CalibrationData.from_path(tmp_path / "big.npz", inputs, samples=4, seed=0, batch_size=2)
    del x
    tracemalloc.start()
    try:
        count = sum(b["x"].shape[0] for b in data())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # two batches of 2 x 196 KB plus zip read buffers: a small constant, far below the 12.6 MB array
    assert count == 4 and peak < 4_000_000


# ----------------------------------------------------------------------------------- batch size and memory
def _dynamic_conv_net() -> Model:
    """conv_net with H and W dynamic: at its peak Relu's input and output are live, 2 x 8 channels x H x W float32
    per sample (16 KB at 16x16)."""
    from tests.calibration.models import conv_net

    proto = conv_net()
    for value, channels in ((proto.graph.input[0], 3), (proto.graph.output[0], 4)):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
        assert dims[1].dim_value == channels
    return Model.from_proto(proto)


def test_the_default_batch_keeps_the_live_activations_at_the_first_samples_shape_within_the_budget(monkeypatch):
    import irtool.calibration.data as data_module

    monkeypatch.setattr(data_module, "ACTIVATION_BUDGET", 3 * 16384 + 100)
    model = _dynamic_conv_net()
    images = [{"x": np.zeros((3, 16, 16), np.float32)} for _ in range(8)]
    assert as_calibration_data(images, model).batch_size == 3
    assert [len(b["x"]) for b in as_calibration_data(images, model)()] == [3, 3, 2]
    small = [{"x": np.zeros((3, 8, 8), np.float32)} for _ in range(16)]  # 4 KB per sample: 12 fit
    assert as_calibration_data(small, model).batch_size == 12
    assert as_calibration_data(images[:3], model).batch_size == 16  # three samples fit: one batch, nothing to say
    assert as_calibration_data(images, model, batch_size=16).batch_size == 16  # asked for: kept
    monkeypatch.setattr(data_module, "ACTIVATION_BUDGET", 100)
    assert as_calibration_data(images, model).batch_size == 1  # one sample at least


def test_the_batch_chosen_for_memory_changes_no_statistic(monkeypatch, caplog):
    """entropy calibration of the dynamic conv net on 10 images, batches chosen for a 3-sample budget (3, 3, 3,
    1) against the default 16: the same ranges, and the log says why the batches are smaller."""
    import json

    import irtool.calibration.data as data_module
    from irtool.api import optimize

    images = [{"x": np.random.default_rng(i).standard_normal((3, 16, 16)).astype(np.float32)} for i in range(10)]

    def ranges() -> dict:
        result = optimize(_dynamic_conv_net().to_proto(), "calibrate{method=entropy}", calibration_data=images)
        return json.loads(result.model.metadata["irtool.calibration"])["ranges"]

    default = ranges()
    monkeypatch.setattr(data_module, "ACTIVATION_BUDGET", 3 * 16384 + 100)
    with caplog.at_level(logging.INFO, logger="irtool.calibration.data"):
        assert ranges() == default
    assert "calibration batches hold 3 samples, not 16" in caplog.text
