"""The calibration session runs each summary as soon as its input exists, with ONNX Runtime's own kernels."""

from __future__ import annotations

import time
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from golden._quant_blocks import residual
from irtool.calibration.schedule import (
    _needed,
    build_while_reading,
    calibration_session,
    side_nodes_first,
    worth_rebuilding,
)
from irtool.calibration.tap import _nchwc_share, _summarized_proto
from irtool.errors import InputError
from irtool.ir.model import Model


def _chain() -> onnx.GraphProto:
    """a -> b -> c -> y, with summaries s_a of a and s_b of b listed last (as a renumbering leaves them)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"), helper.make_node("Relu", ["a"], ["b"], name="B"),
             helper.make_node("Relu", ["b"], ["c"], name="C"), helper.make_node("Relu", ["c"], ["y"], name="Y"),
             helper.make_node("ReduceMax", ["a"], ["s_a"], name="SA"),
             helper.make_node("ReduceMax", ["b"], ["s_b"], name="SB"),
             helper.make_node("Neg", ["s_b"], ["s_b2"], name="SB2")]
    return helper.make_graph(nodes, "chain", [], [])


def test_side_nodes_run_as_soon_as_their_input_exists():
    graph = _chain()
    side_nodes_first(graph, _needed(graph, {"y"}))
    assert [n.name for n in graph.node] == ["A", "SA", "B", "SB", "SB2", "C", "Y"]


def test_the_model_outputs_keep_their_relative_order():
    graph = _chain()
    side_nodes_first(graph, _needed(graph, {"y", "s_a", "s_b2"}))  # everything is needed: the order stays as it was
    assert [n.name for n in graph.node] == ["A", "B", "C", "Y", "SA", "SB", "SB2"]


def _rebuilt(proto: onnx.ModelProto, tmp_path) -> bool:
    """Whether calibration_session rebuilds this graph (ONNX Runtime's NCHWc layout, on x86)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return worth_rebuilding(graph, _needed(graph, {"y"}))


def test_the_scheduled_session_computes_what_onnx_runtime_computes(tmp_path):
    """On a conv net, where the NCHWc transformer renumbers the nodes and the session is rebuilt from the
    reordered graph, every summary equals the one a plain ONNX Runtime session of the tapped graph gives."""
    # 32 channels: ONNX Runtime's NCHWc transformer takes convs whose channels are a multiple of its block (8 with
    # AVX2, 16 with AVX-512), so an 8-channel block stays plain NCHW on an AVX-512 CPU and the test would skip.
    model = Model.from_proto(residual(32))
    proto, _, taps = _summarized_proto(model, ["stem_relu", "relu1", "add", "y"], 16)
    if not _rebuilt(proto, tmp_path):
        pytest.skip("ONNX Runtime applies no NCHWc layout on this CPU: the session is not rebuilt")
    fetch = [out for t in taps.values() for out in t.outputs()]
    plain = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    scheduled = calibration_session(proto, ["y"])
    for seed in range(3):
        feeds = {"x": np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}
        for got, want in zip(scheduled.run(fetch, feeds), plain.run(fetch, feeds), strict=True):
            np.testing.assert_array_equal(got, want)


def test_only_graphs_whose_summaries_pool_conv_layouts_may_be_renumbered():
    """The share of summaries that pool a conv-layout tensor decides whether the optimized graph is saved at all."""
    from tests.calibration.test_tap import _heads

    conv, _, _ = _summarized_proto(Model.from_proto(residual()), ["stem_relu", "relu1", "add", "y"], 16)
    tokens, _, _ = _summarized_proto(_heads(), ["q", "heads", "probs"], 16)
    assert _nchwc_share(conv) >= 0.1 and _nchwc_share(tokens) == 0.0


class _Batch(dict):
    """A batch that can be watched with a weak reference."""


def _batches(count: int, nbytes: int, reads: list[int], fail_at: int | None = None):
    for i in range(count):
        if i == fail_at:
            raise InputError(f"calibration batch {i} is broken")
        reads[0] += 1
        yield _Batch(x=np.full(nbytes // 4, i, np.float32))


def _build_after(reads: list[int], at_least: int, timeout: float = 0.3):
    """A build that finishes once `at_least` batches were read, or after `timeout` seconds."""
    def build():
        deadline = time.monotonic() + timeout
        while reads[0] < at_least and time.monotonic() < deadline:
            time.sleep(0.002)
        return "session"
    return build


def test_the_session_builds_while_batches_are_read_and_every_batch_comes_back_in_order():
    reads = [0]
    built, batches, waited = build_while_reading(_build_after(reads, 3), _batches(6, 64, reads))
    assert built == "session" and reads[0] >= 3 and waited >= 0.0
    assert [int(b["x"][0]) for b in batches] == list(range(6))


def test_reading_ahead_stops_at_the_byte_limit():
    reads = [0]
    built, batches, _ = build_while_reading(_build_after(reads, 10), _batches(20, 1024, reads), limit=3 * 1024)
    assert reads[0] == 3  # the build waited its timeout: the limit, not the build, stopped the reading
    assert [int(b["x"][0]) for b in batches] == list(range(20))


def test_a_batch_read_ahead_is_let_go_once_taken():
    reads = [0]
    _, batches, _ = build_while_reading(_build_after(reads, 4), _batches(4, 64, reads))
    first = next(batches)
    watch = weakref.ref(first)
    del first
    assert watch() is None
    assert [int(b["x"][0]) for b in batches] == [1, 2, 3]


def test_an_error_reading_ahead_is_raised_after_the_build_is_done():
    reads, done = [0], []

    def build():
        time.sleep(0.1)
        done.append(True)
    with pytest.raises(InputError, match="batch 2 is broken"):
        build_while_reading(build, _batches(5, 64, reads, fail_at=2))
    assert done == [True]


def test_an_error_building_is_raised():
    def build():
        raise InputError("the model does not load")
    with pytest.raises(InputError, match="does not load"):
        build_while_reading(build, _batches(2, 64, [0]))


@pytest.mark.parametrize("may_renumber", [False, True])
def test_an_op_onnx_runtime_lacks_is_the_model_s_error_named_in_one_line(may_renumber):
    """A custom-domain op without its library: calibration cannot run the model, which is the input's problem
    (InputError, CLI exit 2), not a failed pass with ONNX Runtime's raw message."""
    graph = helper.make_graph([helper.make_node("Magic", ["x"], ["y"], domain="my.domain")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
                              ir_version=10)
    with pytest.raises(InputError, match=r"calibration runs the model in ONNX Runtime, which cannot run it: .*"
                                         r"my\.domain:Magic\(-1\) is not a registered function/op \(register"):
        calibration_session(proto, ["y"], may_renumber=may_renumber)
