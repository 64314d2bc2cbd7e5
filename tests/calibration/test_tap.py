"""The in-graph summaries of calibration (min, max, NaN flag and strided subsample computed inside ONNX
Runtime) must equal the numpy reference applied to the tensors tapped whole."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from onnx import TensorProto, helper

from golden._quant_blocks import Builder, attention, clip_chain, residual
from irtool.calibration.engine import collect
from irtool.calibration.observers import Histogram, values_per_sample
from irtool.calibration.tap import NCHWC_PRODUCERS, _summarized_proto, detached, summarize, tap
from irtool.errors import InputError
from irtool.ir.model import Model

NAMES = ["x", "stem", "stem_relu", "conv1", "relu1", "conv2", "add", "y"]


def _batches(seed: int, count: int = 3, negative: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        out.append({"x": -np.abs(x) if negative else x})
    return out


@pytest.mark.parametrize("opset", [13, 17, 18])  # ReduceMin/Max take axes as an input from opset 18
@pytest.mark.parametrize("per_sample", [0, 16, 1 << 14])
def test_in_graph_summary_equals_the_numpy_reference(opset, per_sample):
    proto = residual()
    proto.opset_import[0].version = opset
    model = Model.from_proto(proto)
    batches = _batches(opset)
    whole = list(tap(model, NAMES, batches))
    summaries = list(tap(model, NAMES, batches, summary=per_sample))
    assert len(summaries) == len(batches)
    grid = _grids(proto)
    for got, raw in zip(summaries, whole, strict=True):
        for name in NAMES:
            want = summarize(raw[name], per_sample, grid[name])
            assert (got[name].low, got[name].high, got[name].finite) == (want.low, want.high, want.finite), name
            if per_sample:
                np.testing.assert_array_equal(got[name].sample, want.sample)


def _grids(proto) -> dict[str, bool]:
    """Which values the graph samples on a grid: those ONNX Runtime holds in its conv layout (the others, the
    graph input here, take rows)."""
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    return defaultdict(bool, {name: op in NCHWC_PRODUCERS for name, op in producers.items()})


def test_nan_produced_inside_the_model_is_flagged():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["log"]), helper.make_node("Relu", ["log"], ["y"])],
                              "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    (summary,) = list(tap(model, ["log"], _batches(1, count=1, negative=True), summary=0))
    assert summary["log"].finite is False
    (clean,) = list(tap(model, ["log"], [{"x": np.ones((1, 3, 8, 8), np.float32)}], summary=0))
    assert clean["log"].finite is True and clean["log"].low == clean["log"].high == 0.0


def _heads() -> Model:
    """Rank-3 tokens and a rank-4 attention-like Softmax output (not a conv layout): both sampled by whole rows,
    gathered rather than pooled."""
    b = Builder(11)
    q = b.node("MatMul", ["x", b.w("wq", 12, 12)], "q")
    heads = b.node("Reshape", [q, b.const("shape", [0, 2, 6, 6])], "heads")
    probs = b.node("Softmax", [heads], "probs", axis=-1)
    b.node("Reshape", [b.node("Div", [probs, b.node("Abs", [heads], "abs")], "ratio"), b.const("back", [0, 6, 12])],
           "y")
    return Model.from_proto(b.model({"x": [3, 6, 12]}, "y", [3, 6, 12]))


def _dynamic_rows(model: Model) -> Model:
    """The same model with a symbolic sequence length: the number of rows is read from the shape at run time."""
    proto = model.to_proto()
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[1].dim_param = "seq"
    del proto.graph.value_info[:]
    return Model.from_proto(proto)


@pytest.mark.parametrize("rows", ["static", "dynamic"])
@pytest.mark.parametrize("per_sample", [0, 16, 40, 1 << 14])
def test_row_subsamples_of_non_conv_tensors_equal_the_numpy_reference(per_sample, rows):
    model, names = _heads() if rows == "static" else _dynamic_rows(_heads()), ["x", "q", "heads", "probs", "ratio", "y"]
    if rows == "dynamic" and per_sample:
        proto, _, taps = _summarized_proto(model, names, per_sample)
        assert any(n.op_type == "Shape" for n in proto.graph.node)  # the run-time stride really is exercised
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((3, 6, 12)).astype(np.float32)} for _ in range(2)]
    batches[1]["x"][0, 0, :] = 0.0  # q's first row is zero: ratio divides by |0| and holds infinities
    for got, raw in zip(tap(model, names, batches, summary=per_sample), tap(model, names, batches), strict=True):
        for name in names:
            want = summarize(raw[name], per_sample, grid=False)  # no conv layouts here: rows
            low = 0.0 if name == "probs" else want.low  # a Softmax output's low is its bound, 0
            assert (got[name].low, got[name].high, got[name].finite) == (low, want.high, want.finite), name
            if per_sample:
                np.testing.assert_array_equal(got[name].sample, want.sample)
    assert not got["ratio"].finite and got["probs"].finite


def test_only_what_a_producer_leaves_open_is_reduced():
    """A Relu (or a Clip with a constant minimum >= 0) output keeps its bound as its low and needs no min
    reduction; ops that cannot make a NaN from finite inputs get no NaN reduction; the rest get both."""
    proto, whole, taps = _summarized_proto(Model.from_proto(residual()), ["stem", "stem_relu", "add"], 0)
    ops = {n.output[0]: n.op_type for n in proto.graph.node}
    assert whole == []
    assert taps["stem_relu"].low is None and taps["stem_relu"].floor == 0.0
    assert ops[taps["stem"].low] == "ReduceMin" and ops[taps["stem"].high] == "GlobalMaxPool"
    assert all(t.nan is None for t in taps.values())  # Conv, Relu, Add
    _, _, clip_taps = _summarized_proto(Model.from_proto(clip_chain(0.5)), ["act1"], 0)
    assert clip_taps["act1"].low is None and clip_taps["act1"].floor == 0.5
    _, _, signed = _summarized_proto(Model.from_proto(clip_chain(-1.0)), ["act1"], 0)
    assert signed["act1"].low is not None
    _, _, attn_taps = _summarized_proto(Model.from_proto(attention()), ["probs", "scores"], 0)
    assert attn_taps["scores"].nan is None and attn_taps["probs"].nan is not None  # Mul; Softmax is not listed


def test_histogram_bins_are_exact_for_tiny_and_edge_values():
    """floor(v * B / 2R) in float32 is exact for power-of-two R and B: a tiny negative value lands below zero,
    and values just under the radius land in the top bin."""
    hist = Histogram(bins=256, max_per_sample=1 << 14)
    values = np.array([[-1e-30, 1e-30, 0.0, -np.float32(4.0) * (1 - 2**-23), np.float32(4.0) * (1 - 2**-23), 1.0]],
                      np.float32)
    hist.update(values)
    assert hist.radius == 4.0
    expected = np.zeros(256, np.int64)
    for bin_ in (127, 128, 128, 0, 255, 160):
        expected[bin_] += 1
    np.testing.assert_array_equal(hist.counts, expected)


@pytest.mark.parametrize("rows", ["static", "dynamic"])
def test_sample_extremes_replace_the_reductions_except_for_graph_inputs(rows):
    """Histogram methods take a tensor's extremes from its sample: no min/max reduction in the graph but for the
    graph inputs and the tensors named `exact` (calibrate's probabilities and logits, which it does not clip: here a
    Softmax's, whose maximum is reduced and minimum is the floor 0); the Summary leaves the extremes to the
    histogram (high None, low the producer's floor) and the engine's statistics are the sample's; an infinity still
    shows through the NaN check's sum (`ratio` divides by |0|) or in the sample's extremes (`y`)."""
    model, names = _heads() if rows == "static" else _dynamic_rows(_heads()), ["x", "q", "heads", "probs", "ratio", "y"]
    proto, _, taps = _summarized_proto(model, names, 40, sample_extremes=True, exact=["probs"])
    reducers = {n.input[0] for n in proto.graph.node if n.op_type in ("ReduceMax", "ReduceMin", "GlobalMaxPool")}
    assert {t.high for t in taps.values()} - {None} == {taps["x"].high, taps["probs"].high}
    assert reducers == {"__irtool_tap0_flat", "probs"}
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((3, 6, 12)).astype(np.float32)} for _ in range(2)]
    batches[1]["x"][0, 0, :] = 0.0
    exact = list(tap(model, names, batches, summary=40))
    for index, got in enumerate(tap(model, names, batches, summary=40, sample_extremes=True, exact=["probs"])):
        assert (got["x"].low, got["x"].high) == (exact[index]["x"].low, exact[index]["x"].high)
        for name in names[1:]:
            sample, summary = exact[index][name].sample, got[name]
            np.testing.assert_array_equal(summary.sample, sample)
            finite = not (name == "ratio" and index == 1)  # y reshapes ratio: its infinity is in its sample
            if name == "probs":
                assert (summary.low, summary.high, summary.finite) == (0.0, exact[index][name].high, True)
                continue
            assert (summary.low, summary.high, summary.finite) == (-np.inf, None, finite), name
    stats = collect(model, names, lambda: batches[:1], histograms=True, exact=["probs"])
    (exact,) = tap(model, names, batches[:1], summary=values_per_sample(None))  # the engine's sample size
    for name in names[1:]:
        sample = exact[name].sample
        expected = (0.0, exact[name].high) if name == "probs" else (float(sample.min()), float(sample.max()))
        assert (stats[name].minmax.low, stats[name].minmax.high) == expected, name
    assert (stats["x"].minmax.low, stats["x"].minmax.high) == (exact["x"].low, exact["x"].high)
    for name in ("ratio", "y"):  # by the NaN check's sum, and by the extremes the histogram takes of the sample
        with pytest.raises(InputError, match=f"'{name}' holds NaN or Inf"):
            collect(model, [name], lambda: batches, histograms=True)


def test_infinity_outside_the_sample_is_caught_by_the_nan_check():
    """q's last row is zero, so ratio's infinities sit in rows its 16-value sample skips; Div is not NaN-free,
    and the sum its NaN check takes over the whole tensor is not finite."""
    x = np.random.default_rng(2).standard_normal((3, 6, 12)).astype(np.float32)
    x[0, 5, :] = 0.0
    (got,) = list(tap(_heads(), ["ratio"], [{"x": x}], summary=16, sample_extremes=True))
    assert np.isfinite(got["ratio"].sample).all() and not got["ratio"].finite


def test_detached_outputs_own_their_memory_and_outlive_the_session():
    """ONNX Runtime returns views of its allocator's memory (a kept one held a whole arena after its session was
    gone); detached copies own theirs, equal value for value."""
    model = Model.from_proto(residual())
    raw = list(tap(model, ["y", "relu1"], _batches(5)))
    assert not raw[0]["y"].flags["OWNDATA"]
    copies = [detached(values) for values in raw]
    expected = [{name: value.copy() for name, value in values.items()} for values in raw]
    del raw
    for got, want in zip(copies, expected, strict=True):
        assert all(got[name].flags["OWNDATA"] for name in got)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
