"""Run a model over calibration batches and hand chosen intermediate values to the caller.

The model is copied with the requested values added as graph outputs (typed from shape
inference), so ONNX Runtime computes them in the same run as the real outputs. Values are yielded
one batch at a time and never accumulated here: memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types

log = logging.getLogger(__name__)


def tapped_proto(model: Model, names: list[str]) -> onnx.ModelProto:
    proto = model.to_proto()
    types = infer_types(proto)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name in existing:
            continue
        elem = types.get(name, (onnx.TensorProto.FLOAT, None))[0] or onnx.TensorProto.FLOAT
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return proto


def tap(model: Model, names: list[str], batches: Iterable[Mapping[str, np.ndarray]],
        threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield {name: value} for each batch, for the requested value names."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    proto = tapped_proto(model, names)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for index, batch in enumerate(batches):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise InputError(f"calibration batch {index} lacks model input(s) {', '.join(missing)}")
        feeds = {n: np.asarray(batch[n]) for n in input_names}
        values = session.run(names, feeds)
        yield dict(zip(names, values, strict=True))


def channel_means(model: Model, axes: Mapping[str, int],
                  batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean of each named value over everything but its channel axis, averaged over the batches
    (float64, streamed: one batch of values in memory at a time)."""
    names = sorted(axes)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for values in tap(model, names, batches):
        count += 1
        for name, value in values.items():
            axis = axes[name] % value.ndim
            other = tuple(i for i in range(value.ndim) if i != axis)
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64).mean(axis=other)
    if count == 0:
        raise InputError("calibration data is empty")
    return {name: total / count for name, total in sums.items()}
