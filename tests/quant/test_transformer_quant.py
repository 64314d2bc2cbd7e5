"""Transformers: the default `quant` pipeline must reach embedding cosine >= 0.98 even where the plain
static INT8 recipe fails (outlier channels, as real BERT-style encoders have)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from irtool.api import optimize
from tests.quant.torch_models import encoder_proto


def with_outliers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Two hidden channels of the first LayerNorm get 60x gain: the activation outliers of real encoders."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name == "blocks.0.ln1.weight":
            w = numpy_helper.to_array(t).copy()
            w[[3, 17]] *= 60.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            return out
    raise AssertionError("encoder has no blocks.0.ln1.weight")


def data(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 16, 32)).astype(np.float32)} for _ in range(count)]


def embeddings(proto: onnx.ModelProto, batches) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0].reshape(-1, 64) for b in batches])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
def test_default_quant_keeps_embedding_cosine(outliers):
    proto = with_outliers(encoder_proto()) if outliers else encoder_proto()
    calib, test = data(0, 16), data(1, 8)
    reference = embeddings(proto, test)
    result = optimize(proto, "quant", calibration_data=calib, verify_each=True)
    cosine = mean_cosine(reference, embeddings(result.model.to_proto(), test))
    assert cosine >= 0.98, cosine
    kept = result.records[-1].stats["layers_kept_float"]
    assert bool(kept) == outliers  # mixed precision only where plain INT8 falls short
    if outliers:
        plain = optimize(proto, "cleanup,calibrate,insert-qdq", calibration_data=calib).model.to_proto()
        assert mean_cosine(reference, embeddings(plain, test)) < 0.98  # the plain static recipe fails here


def test_quant_dynamic_keeps_cosine_099():
    proto = encoder_proto()
    test = data(2, 8)
    out = optimize(proto, "quant-dynamic").model.to_proto()
    assert mean_cosine(embeddings(proto, test), embeddings(out, test)) >= 0.99
