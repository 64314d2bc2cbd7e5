"""Analysis `shapes`: dtype and shape of every value, from onnx shape inference on the weight-free
skeleton, with user-supplied static shapes (`--input-shape input:1x3x224x224`) substituted for
symbolic input dims first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types, symbol_sizes
from irtool.passmanager import Analysis, PassContext


@dataclass
class ShapeInfo:
    types: dict[str, tuple[int, list[int | str] | None]]

    def shape(self, name: str) -> list[int | str] | None:
        entry = self.types.get(name)
        return None if entry is None else entry[1]

    def static_shape(self, name: str) -> list[int] | None:
        dims = self.shape(name)
        if dims is None or any(not isinstance(d, int) for d in dims):
            return None
        return list(dims)

    def dtype(self, name: str) -> np.dtype | None:
        entry = self.types.get(name)
        if entry is None or not entry[0]:
            return None
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(entry[0]))


class Shapes(Analysis):
    """Dtypes and shapes of every value in the main graph."""

    name = "shapes"

    def compute(self, model: Model, ctx: PassContext) -> ShapeInfo:
        return ShapeInfo(infer_types(model.shape_inference_proto(), ctx.input_shapes or None))


def concrete_input_shapes(model: Model, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Input shapes with every symbolic dim not fixed by `given` set to 1 (a cost-per-sample view). A named dim
    that one given shape fixes is fixed in every input (symbol_sizes)."""
    shapes = dict(given or {})
    sizes = symbol_sizes([(t.name, t.shape) for t in model.graph.inputs], shapes)
    for tensor in model.graph.inputs:
        if tensor.name in shapes or tensor.shape is None:
            continue
        shapes[tensor.name] = [d if isinstance(d, int) and d >= 0 else sizes.get(d, 1) for d in tensor.shape]
    return shapes


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """`name:1x3x224x224` -> ("name", [1, 3, 224, 224]); `name:scalar` -> ("name", []) (a rank-0 input, such as
    a diffusion timestep); the name may itself contain ':'."""
    name, sep, dims_text = text.rpartition(":")
    if not sep or not name:
        raise InputError(f"--input-shape {text!r}: expected NAME:DxDxD, e.g. input:1x3x224x224")
    if dims_text.lower() == "scalar":
        return name, []
    bad = InputError(f"--input-shape {text!r}: dims must be positive integers joined by 'x' (or 'scalar')")
    try:
        dims = [int(d) for d in dims_text.lower().split("x")]
    except ValueError:
        raise bad from None
    if any(d <= 0 for d in dims):
        raise bad
    return name, dims
