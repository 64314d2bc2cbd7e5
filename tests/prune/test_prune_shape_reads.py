"""prune where a reshape target copies, at run time, the channel count of another tensor (Shape(t)[1]): torch.export
writes attention's kᵀ that way (back to Shape(k)[:2] = [B, H]). Where that entry is the reshape's channel entry and
t has as many channels, the two are tied and the entry follows the pruning by itself; anywhere else t is locked,
since the entry would change under it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


def _model(target_tail: str) -> onnx.ModelProto:
    """x [n, 3, 4, 4] -> a (3->4, a 3x3 conv + Relu) and b (3->8, 1x1); b reshaped to a target that reads
    Shape(a)[0:2] = [n, a's C] (run time: n is dynamic, so no folding takes it): 'channels': [n, a's C, -1] (b's 8
    channels in pairs on a's 4), 'other': b as NHWC [n, 4, 4, 8] to [n, a's C, 4, 8] (a's C lands on the height,
    4 by design; b's channels stay last). Both feed a mean, added to a's and classified."""
    rng = np.random.default_rng(0)
    weights = {"a.w": (4, 3, 3, 3), "a.b": (4,), "b.w": (8, 3, 1, 1), "b.b": (8,), "head.w": (5, 4), "head.b": (5,)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n) for n, s in weights.items()]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("lo", [0]), ("hi", [2]), ("minus1", [-1]), ("eight", [8]), ("four", [4]),
               ("n_hi", [1]), ("axes", [2, 3]), ("last", [2]), ("spatial", [1, 2]))]
    nodes = [helper.make_node("Conv", ["x", "a.w", "a.b"], ["a_conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a_conv"], ["a"]),
             helper.make_node("Conv", ["x", "b.w", "b.b"], ["b"]),
             helper.make_node("Shape", ["a"], ["a_shape"])]
    if target_tail == "channels":
        nodes += [helper.make_node("Slice", ["a_shape", "lo", "hi"], ["n_c"]),
                  helper.make_node("Concat", ["n_c", "minus1"], ["target"], axis=0)]
    else:
        nodes += [helper.make_node("Transpose", ["b"], ["b_nhwc"], perm=[0, 2, 3, 1]),
                  helper.make_node("Slice", ["a_shape", "lo", "hi"], ["n_c"]),
                  helper.make_node("Concat", ["n_c", "four", "eight"], ["target"], axis=0)]
    reduce_axes = "last" if target_tail == "channels" else "spatial"
    nodes += [helper.make_node("Reshape", ["b" if target_tail == "channels" else "b_nhwc", "target"], ["folded"]),
              helper.make_node("ReduceMean", ["folded", reduce_axes], ["b_mean"], keepdims=0),
              helper.make_node("ReduceMean", ["a", "axes"], ["a_mean"], keepdims=0)]
    if target_tail == "channels":
        nodes.append(helper.make_node("Add", ["a_mean", "b_mean"], ["mixed"]))
    else:  # b_mean is [n, 8]: its first 4 channels go with a's
        nodes += [helper.make_node("Slice", ["b_mean", "lo", "four", "n_hi"], ["b_first"]),
                  helper.make_node("Add", ["a_mean", "b_first"], ["mixed"])]
    nodes.append(helper.make_node("Gemm", ["mixed", "head.w", "head.b"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "shape_reads", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _conv_widths(proto: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(t.dims[0]) for t in proto.graph.initializer if t.name in ("a.w", "b.w")}


# 'other': a is locked, so b's first 4 channels (added to a's) stay; its last 4 lose 2
@pytest.mark.parametrize(("target", "widths"), [("channels", {"a.w": 2, "b.w": 4}), ("other", {"a.w": 4, "b.w": 6})])
def test_a_channel_count_read_into_another_reshape_is_tied_or_locked(target, widths):
    original = _model(target)
    onnx.checker.check_model(original, full_check=True)
    model, removed, _ = prune(original, "prune{ratio=0.5,round-to=1}")
    pruned = model.to_proto()
    assert _conv_widths(pruned) == widths
    x = {"x": np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(pruned, x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)


def _reshaped_conv(out_channels: int, target: list[int] | None) -> onnx.ModelProto:
    """x [1, 3, 4, 4] -> Conv (3 -> out_channels) -> Reshape to `target`, or to the graph input `t` when None."""
    w = numpy_helper.from_array(np.ones((out_channels, 3, 1, 1), np.float32), "w")
    inits = [w] + ([numpy_helper.from_array(np.array(target, np.int64), "t")] if target else [])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    inputs += [] if target else [helper.make_tensor_value_info("t", TensorProto.INT64, [3])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "t"], ["r"], name="r"),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize(("channels", "target", "reason"), [
    (1, [1, 4, 4], "Reshape 'r' drops the channel axis, which holds a single channel"),  # YOLOv8's DFL output
    (4, None, "Reshape 'r' has dims shape inference left unknown (a target computed at run time)")])
def test_reshape_lock_reasons_say_what_stopped_the_channels(channels, target, reason):
    from tests.prune.test_prune_archs import analysis

    assert [g.locked for g in analysis(_reshaped_conv(channels, target)).groups] == [reason]
