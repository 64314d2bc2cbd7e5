"""Shape vectors with -1 entries, resolved at compile time (used by `fold-constants`).

torch's legacy exporter writes `t.expand(B, -1, -1)` with a batch B known only at run time as

    target = Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [-1])
    Expand(t, Where(Equal(target, [-1, -1, -1]), [1, 1, 1], target))

(-1 means "keep this dim", which Expand spells 1). Shape inference does not follow Equal and Where, so
the Expand's output dims, and every shape computed from them (the heads reshape of DETR's learned queries),
stay unknown. But a dim read from a Shape is never negative: Equal against a negative constant is False
there, so the Equal folds to a constant mask, and a Where with a constant mask over a Concat picks whole
pieces: it becomes the Concat of the picked pieces ([B, 1, 1] here), which shape inference follows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.rewrite import ValueTypes

DIM = np.iinfo(np.int64).min  # an element read from a Shape: unknown, never negative
MAX_DEPTH = 8


def dims_equal(node: gs.Node, types: ValueTypes) -> np.ndarray | None:
    """The value of Equal(dims, constant) when it is decided: every element of `dims` that comes from a Shape
    is compared with a negative number; None otherwise."""
    if node.op != "Equal" or len(node.inputs) != 2:
        return None
    a, b = (_elements(t, types) for t in node.inputs)
    if a is None or b is None:
        return None
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        return None
    undecided = ((a == DIM) & ((b == DIM) | (b >= 0))) | ((b == DIM) & (a >= 0))
    return None if undecided.any() else np.asarray(a == b)


def select_pieces(node: gs.Node, types: ValueTypes, unique: Callable[[str], str]) -> list[gs.Tensor] | None:
    """The Concat inputs a Where(constant mask, constant x, Concat(pieces)) amounts to: each piece whole, or the
    matching slice of x where the mask picks it; None where the mask splits a piece or shapes do not line up."""
    if node.op != "Where" or len(node.inputs) != 3:
        return None
    mask, x, y = node.inputs
    concat = _producer(y)
    if concat is not None and concat.op == "Reshape" and isinstance(concat.inputs[1], gs.Constant) \
            and np.asarray(concat.inputs[1].values).size == 1:  # the exporter's Reshape(target, [-1])
        concat = _producer(concat.inputs[0])
    if not isinstance(mask, gs.Constant) or not isinstance(x, gs.Constant) or concat is None \
            or concat.op != "Concat" or int(concat.attrs.get("axis", 0)) != 0:
        return None
    lengths = [_length(p, types) for p in concat.inputs]
    flags, values = np.asarray(mask.values), np.asarray(x.values)
    if None in lengths or flags.ndim != 1 or flags.size != sum(lengths) or values.ndim != 1 \
            or values.size not in (1, flags.size) or values.dtype != np.int64:
        return None
    values = np.broadcast_to(values, flags.shape)
    pieces, start = [], 0
    for piece, length in zip(concat.inputs, lengths, strict=True):
        picked = flags[start:start + length]
        if picked.all():
            pieces.append(gs.Constant(unique(f"{node.name}_picked"), values[start:start + length].copy()))
        elif not picked.any():
            pieces.append(piece)
        else:
            return None
        start += length
    return pieces


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _length(t: gs.Tensor, types: ValueTypes) -> int | None:
    """Length of a 1-D int64 tensor, from its values or its inferred type."""
    if isinstance(t, gs.Constant):
        values = np.asarray(t.values)
        return int(values.size) if values.ndim == 1 and values.dtype == np.int64 else None
    entry = types.get(t.name)
    dims = entry[1] if entry is not None else None
    return dims[0] if dims is not None and len(dims) == 1 and isinstance(dims[0], int) else None


def _elements(t: gs.Tensor, types: ValueTypes, depth: int = MAX_DEPTH) -> np.ndarray | None:
    """A 1-D (or 0-D) integer tensor as values, DIM where a dim read from a Shape stands; None if it is anything
    else than constants and Shape pieces moved by Gather, Slice, Unsqueeze, Squeeze, Concat and a 1-D Reshape."""
    if isinstance(t, gs.Constant):
        values = np.asarray(t.values)
        return values.astype(np.int64) if values.dtype.kind in "iu" and values.ndim <= 1 else None
    node = _producer(t)
    if node is None or depth == 0:
        return None
    if node.op == "Shape":
        entry = types.get(node.inputs[0].name)
        if entry is None or entry[1] is None:
            return None
        return shape_slice(node, [DIM] * len(entry[1]))
    inputs = [_elements(i, types, depth - 1) if i.name else None for i in node.inputs]
    return None if not inputs or inputs[0] is None else _moved(node, inputs)


def _moved(node: gs.Node, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    data = inputs[0]
    try:
        if node.op == "Concat" and all(v is not None for v in inputs):
            return np.concatenate([np.atleast_1d(v) for v in inputs])
        if node.op == "Gather" and len(inputs) > 1 and inputs[1] is not None and DIM not in inputs[1]:
            return np.take(data, inputs[1], axis=int(node.attrs.get("axis", 0)))
        if node.op == "Unsqueeze" and data.ndim == 0:
            return data.reshape(1)
        if node.op == "Squeeze" and data.size == 1:
            return data.reshape(())
        if node.op == "Reshape" and len(inputs) > 1 and inputs[1] is not None and inputs[1].size == 1:
            return data.reshape(-1)  # torch's legacy exporter flattens the target it builds: Reshape(shape, [-1])
        if node.op == "Slice" and data.ndim == 1 and len(inputs) > 2 and inputs[1] is not None \
                and inputs[2] is not None and not any(v is not None and DIM in v for v in inputs[1:]):
            return slice_vector(data, inputs[1:])
    except (IndexError, ValueError):
        return None
    return None


def slice_vector(dims: np.ndarray, args: list[np.ndarray | None]) -> np.ndarray:
    """Slice (opset >= 10: starts, ends, axes, steps inputs) of a 1-D array."""
    starts, ends = args[0], args[1]
    axes = args[2] if len(args) > 2 and args[2] is not None else None
    steps = args[3] if len(args) > 3 and args[3] is not None else np.ones_like(starts)
    if axes is not None and any(int(a) not in (0, -1) for a in axes):
        raise ValueError("a 1-D Shape has axis 0 only")
    if len(starts) != 1:
        raise ValueError("one axis")
    return dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]


def shape_slice(node: gs.Node, shape: list[int]) -> np.ndarray:
    """What a Shape node outputs for `shape`, honouring its start and end."""
    rank = len(shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    return np.array(shape[slice(start, end)], dtype=np.int64)
