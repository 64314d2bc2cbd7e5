"""Running a model in ONNX Runtime for the placement tests, optionally saving the graph it optimized."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def run_batches(proto: onnx.ModelProto, batches, optimized: str | None = None) -> np.ndarray:
    """The first output over `batches`, concatenated; with `optimized`, ONNX Runtime's optimized graph is saved there
    (what it fused into integer kernels)."""
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0] for b in batches])
