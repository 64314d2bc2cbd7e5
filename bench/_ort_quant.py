"""quantize_static as the INT8 decoder and high-resolution benchmarks run it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def quantize_static_minmax(src: str, dst: str, batches: Iterable[Mapping[str, np.ndarray]]) -> None:
    """ONNX Runtime's quantize_static of the model at `src` into `dst`: QDQ, per-channel, reduce_range, u8
    activations x s8 weights, minmax calibration over `batches` (each a feed dict)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            return next(self.items, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
