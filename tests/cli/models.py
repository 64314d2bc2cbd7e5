"""Small ONNX files for CLI tests: one good model and every kind of bad input the loader refuses."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnxruntime here accepts IR version <= 13; onnx 1.23 would default to 14.
IR_VERSION = 10


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """x -> Conv -> Relu -> y, plus a dead Sigmoid branch that `dce` removes."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu"),
             helper.make_node("Sigmoid", ["c"], ["dead"], name="dead_sig")]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def write_tiny(path: Path, opset: int = 17) -> Path:
    path.write_bytes(tiny_model(opset).SerializeToString())
    return path


def _with_external_location(path: Path, location: str) -> Path:
    model = tiny_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "432")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


def _truncated(path: Path) -> Path:
    data = tiny_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_a_model(path: Path) -> Path:
    # A valid protobuf of another message type: the graph alone, without the model around it.
    path.write_bytes(tiny_model().graph.SerializeToString())
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _unconvertible(path: Path) -> Path:
    """Declares opset 8 but uses Erf (added in 9): onnx.version_converter has no adapter to upgrade it."""
    model = tiny_model(opset=8)
    model.graph.node[1].op_type = "Erf"
    path.write_bytes(model.SerializeToString())
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


BAD_INPUTS = {
    "missing": lambda p: p,
    "directory": _directory,
    "empty": lambda p: (p.write_bytes(b""), p)[1],
    "random-bytes": _random_bytes,
    "truncated": _truncated,
    "not-a-model": _not_a_model,
    "opset-unconvertible": _unconvertible,
    "opset-too-new": lambda p: write_tiny(p, opset=onnx.defs.onnx_opset_version() + 5),
    "external-data-missing": lambda p: _with_external_location(p, "weights.bin"),
    "external-data-absolute": lambda p: _with_external_location(p, "/etc/passwd"),
    "external-data-dotdot": lambda p: _with_external_location(p, "../weights.bin"),
}

# What each message must mention, so the right check fired (not just any error).
BAD_INPUT_MESSAGES = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "file is empty",
    "random-bytes": "not a valid ONNX protobuf",
    "truncated": "not a valid ONNX protobuf",
    "not-a-model": "not an ONNX model",
    "opset-unconvertible": "opset 8 could not be upgraded to 13",
    "opset-too-new": "newer than",
    "external-data-missing": "missing",
    "external-data-absolute": "absolute",
    "external-data-dotdot": "leaves the model folder",
}
