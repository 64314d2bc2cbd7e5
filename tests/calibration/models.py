"""Small models and data files for calibration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime here accepts IR version <= 13

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
ONE = [("x", F32, (None, 3, 4, 4))]  # a single image-like input
TWO = [("a", F32, (None, 2)), ("b", I64, (None, 3))]  # a float and an int input


def conv_net() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8) -> Relu -> Conv(4, 1x1) -> y: the 8 middle channels are prunable."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def write_conv_net(path: Path) -> Path:
    path.write_bytes(conv_net().SerializeToString())
    return path


def samples(n: int, shape: tuple[int, ...] = (3, 4, 4), start: int = 0, dtype=np.float32) -> np.ndarray:
    """n distinct samples: sample i is filled with start + i plus a ramp, so every value is traceable."""
    ramp = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) / 1000
    return np.stack([ramp + start + i for i in range(n)]).astype(dtype)


def concat(data) -> dict[str, np.ndarray]:
    batches = list(data())
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
