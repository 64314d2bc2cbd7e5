"""--input-shape for one input fixes its named dims in every input that has them: an image and its mask share the
batch N and the size H x W, token ids and their attention mask the sequence length. Before, the other input's
dims counted as 1: opt and inspect reported its conv at 1x1 pixels, bench timed a broadcast 1x1 input, and two
given shapes that disagreed on N were both taken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.analysis.shapes import Shapes
from irtool.api import optimize
from irtool.backends.ort import make_inputs
from irtool.calibration.validate import model_inputs
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.passmanager import PassContext
from tests.cli.conftest import assert_one_line_error, run_cli
from tests.passes.helpers import serialized


def two_inputs() -> onnx.ModelProto:
    """a, b [N, 3, H, W] -> a 3x3 conv each (3 -> 8), added, Relu, 1x1 conv (8 -> 4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 3, 3, 3)), ("w3", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["a", "w1"], ["ca"], pads=[1] * 4),
             helper.make_node("Conv", ["b", "w2"], ["cb"], pads=[1] * 4),
             helper.make_node("Add", ["ca", "cb"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Conv", ["r", "w3"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, "H", "W"]) for n in "ab"]
    graph = helper.make_graph(nodes, "two", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MACS_8X8 = 2 * 8 * 3 * 9 * 64 + 4 * 8 * 64  # two 3x3 convs and the 1x1 conv over 8x8 pixels, batch 1


def test_the_other_input_takes_the_named_dims_a_given_shape_fixes():
    result = optimize(two_inputs(), "dce", input_shapes={"a": [1, 3, 8, 8]})
    assert result.cost_input_shapes == {"a": [1, 3, 8, 8], "b": [1, 3, 8, 8]}
    assert result.before.total_macs == MACS_8X8 + 2 * 8 * 64  # and one op per element for the Add and the Relu
    shapes = PassContext(input_shapes={"a": [2, 3, 8, 8]}).analysis(Shapes, Model.from_proto(two_inputs()))
    assert shapes.shape("b") == [2, 3, 8, 8] and shapes.shape("y") == [2, 4, 8, 8]
    feeds = make_inputs(two_inputs(), input_shapes={"a": [2, 3, 6, 5]})
    assert {k: v.shape for k, v in feeds.items()} == {"a": (2, 3, 6, 5), "b": (2, 3, 6, 5)}


@pytest.mark.parametrize("call", ["optimize", "make_inputs"])
def test_given_shapes_that_disagree_on_a_name_are_refused(call):
    shapes = {"a": [1, 3, 8, 8], "b": [2, 3, 8, 8]}
    with pytest.raises(InputError, match=r"--input-shape b: dim 0 \('N'\) is 2, but --input-shape a makes 'N' 1"):
        if call == "optimize":
            optimize(two_inputs(), "dce", input_shapes=shapes)
        else:
            make_inputs(two_inputs(), input_shapes=shapes)


@pytest.mark.parametrize("command", ["opt", "inspect", "bench"])
def test_the_cli_refuses_disagreeing_shapes_in_one_line(tmp_path: Path, command: str):
    model = tmp_path / "two.onnx"
    onnx.save(two_inputs(), model)
    out = tmp_path / "out.onnx"
    args = ["-o", out, "--passes", "dce"] if command == "opt" else []
    result = run_cli(command, model, *args, "--input-shape", "a:1x3x8x8", "--input-shape", "b:1x3x8x4")
    assert_one_line_error(result, 2, "dim 3 ('W') is 4, but --input-shape a makes 'W' 8")
    assert not out.exists()


def test_random_calibration_fills_the_other_input_from_the_named_dims():
    """--calib-data random with --input-shape for one input: the other's H and W were unknown and calibration
    stopped ("random calibration data needs a static shape ... give --input-shape b:DxD..")."""
    inputs = model_inputs(Model.from_proto(two_inputs()), {"a": [1, 3, 6, 5]})
    assert [(i.name, i.shape) for i in inputs] == [("a", (None, 3, 6, 5)), ("b", (None, 3, 6, 5))]
    result = optimize(two_inputs(), "calibrate", input_shapes={"a": [1, 3, 6, 5]}, calibration_data="random",
                      calib_samples=4)
    assert result.records[0].stats["observed"] == 6  # a, b, both convs, the Add and the Relu


def shape_folded() -> onnx.ModelProto:
    """ids, mask [B, T]: Reshape(ids + mask, Shape(mask)) so fold-constants folds a Shape only at a given T."""
    nodes = [helper.make_node("Add", ["ids", "mask"], ["s"]), helper.make_node("Shape", ["mask"], ["shape"]),
             helper.make_node("Reshape", ["s", "shape"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "T"]) for n in ("ids", "mask")]
    graph = helper.make_graph(nodes, "pair", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_model_specialized_to_a_given_shape_declares_it_in_every_input_sharing_its_dims():
    result = optimize(shape_folded(), "fold-constants", input_shapes={"ids": [2, 7]})
    assert result.records[0].stats["inputs_pinned"] == ["ids", "mask"]
    assert {t.name: t.shape for t in result.model.graph.inputs} == {"ids": [2, 7], "mask": [2, 7]}


def test_calibration_batches_split_to_the_batch_a_pinned_input_declares():
    """fold-constants pins --input-shape ids:1x7 on the model mid-pipeline, after the calibration data were batched
    by 8: calibrate stopped ("input 'ids' has shape [4, 7], the model declares [1, 7]"). Its batches are split to
    the declared batch now, and the statistics are the same as with --calib-batch-size 1."""
    proto = shape_folded()
    proto.graph.node.append(helper.make_node("MatMul", ["y", "w"], ["z"]))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((7, 3), np.float32), "w"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    runs = [optimize(proto, "fold-constants,calibrate,insert-qdq", input_shapes={"ids": [1, 7]},
                     calibration_data="random", calib_samples=4, calib_batch_size=size) for size in (None, 1)]
    assert runs[0].records[1].stats["observed"] > 0
    assert serialized(runs[0].model) == serialized(runs[1].model)
    assert any(n.op == "QuantizeLinear" for n in runs[0].model.graph.nodes)
