"""Running a model in ONNX Runtime for the placement tests, optionally saving the graph it optimized."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def run_batches(proto: onnx.ModelProto, batches, optimized: str | None = None) -> np.ndarray:
    """The first output over `batches`, concatenated; with `optimized`, ONNX Runtime's optimized graph is saved there
    (what it fused into integer kernels)."""
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0] for b in batches])


def optimized_ops(proto: onnx.ModelProto, path: str, batches) -> Counter:
    """Op counts of the graph ONNX Runtime optimized `proto` into (saved at `path`), after running `batches`."""
    run_batches(proto, batches, path)
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def intermediate_values(proto: onnx.ModelProto, names: list[str], batches) -> dict[str, np.ndarray]:
    """Every value of the tensors `names` over `batches`, flattened: the model run with them as extra outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, b) for b in batches]
    return {n: np.concatenate([r[i].ravel() for r in runs]) for i, n in enumerate(names)}
