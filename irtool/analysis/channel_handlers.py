"""Per-op channel handlers (one per op type, Torch-Pruning's per-layer pruners as a registry).

A handler answers two questions for its op:
  propagate(node, b): which axis of each output carries channels, and how they tie to the inputs'
                      (see irtool.analysis.channels);
  apply(node, view):  after pruning, slice the node's weights/attributes; view.keep(tensor) gives
                      the surviving channel indices of a tensor, or None when it lost none.
Adding an op is adding a handler here, not editing an if-chain.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channels import Builder, PruneView

HANDLERS: dict[str, Handler] = {}


def handles(*ops: str):
    def register(cls):
        for op in ops:
            HANDLERS[op] = cls()
        return cls

    return register


class Handler:
    def propagate(self, node: gs.Node, b: Builder) -> None:
        raise NotImplementedError

    def apply(self, node: gs.Node, view: PruneView) -> None:
        """Default: the node has no weights of its own; shapes follow its inputs."""


def _constant(tensor: gs.Tensor) -> gs.Constant | None:
    return tensor if isinstance(tensor, gs.Constant) else None


def _take(constant: gs.Constant, indices: np.ndarray | None, axis: int) -> None:
    if indices is not None:
        constant.values = np.ascontiguousarray(np.take(np.asarray(constant.values), indices, axis=axis))


def _only_use(constant: gs.Constant) -> bool:
    """Weights shared by several nodes cannot be sliced for one of them."""
    return len(constant.outputs) <= 1


@handles("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu",
         "Softplus", "Softsign", "Clip", "Identity", "Dropout", "Cast", "Neg", "Abs", "Sqrt", "Exp",
         "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample")
class PassThrough(Handler):
    """Output channel i is input channel i."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        if b.new_space(y, space.axis) is not None:
            b.tie(x, y)


@handles("BatchNormalization", "InstanceNormalization")
class ChannelNorm(Handler):
    """Per-channel parameters on axis 1; slicing them is exact (no cross-channel statistics)."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        if space.axis != 1 or any(_constant(p) is None or not _only_use(p) for p in node.inputs[1:]):
            b.lock(x, f"{node.op} {node.name!r} normalizes another axis or has non-constant parameters")
            return
        if b.new_space(y, 1) is not None:
            b.tie(x, y)

    def apply(self, node, view):
        indices = view.keep(node.inputs[0])
        for param in node.inputs[1:]:
            _take(param, indices, 0)


@handles("Conv")
class Conv(Handler):
    """W: [C_out, C_in/groups, k...]. Output channels are filters; depthwise ties in to out."""

    def propagate(self, node, b):
        x, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        group = int(node.attrs.get("group", 1))
        if w is None or not _only_use(w) or (len(node.inputs) > 2 and _constant(node.inputs[2]) is None):
            b.lock(x, f"Conv {node.name!r} has non-constant or shared weights") if b.space(x) else None
            return
        weights = np.asarray(w.values)
        depthwise = group > 1 and group == weights.shape[0] and weights.shape[1] == 1
        space_in = b.space(x)
        if group > 1 and not depthwise:
            if space_in is not None:
                b.lock(x, f"grouped Conv {node.name!r} (group={group}) is not handled yet")
            return
        if space_in is not None and space_in.axis != 1:
            b.lock(x, f"Conv {node.name!r} reads channels on axis {space_in.axis}")
            return
        if b.new_space(y, 1) is None:
            return
        if depthwise:
            if space_in is None:
                b.lock(y, f"depthwise Conv {node.name!r} input has no channel space")
            else:
                b.tie(x, y)
        b.add_filters(node, y, weights.reshape(weights.shape[0], -1))

    def apply(self, node, view):
        w = node.inputs[1]
        out_keep, in_keep = view.keep(node.outputs[0]), view.keep(node.inputs[0])
        group = int(node.attrs.get("group", 1))
        _take(w, out_keep, 0)
        if len(node.inputs) > 2:
            _take(node.inputs[2], out_keep, 0)
        if group > 1:
            node.attrs["group"] = int(np.asarray(w.values).shape[0])
        else:
            _take(w, in_keep, 1)


@handles("Gemm")
class Gemm(Handler):
    """Y = A·B (+C), B: [K, N] or [N, K] with transB. Output features are filters."""

    def propagate(self, node, b):
        a, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        space_in = b.space(a)
        trans_a = int(node.attrs.get("transA", 0))
        if w is None or not _only_use(w) or (len(node.inputs) > 2 and _constant(node.inputs[2]) is None):
            if space_in is not None:
                b.lock(a, f"Gemm {node.name!r} has non-constant or shared weights")
            return
        if space_in is not None and (trans_a or space_in.axis != 1):
            b.lock(a, f"Gemm {node.name!r} reads channels on an axis it does not reduce over")
            return
        if b.new_space(y, 1) is None:
            return
        weights = np.asarray(w.values)
        rows = weights if int(node.attrs.get("transB", 0)) else weights.T
        b.add_filters(node, y, rows)

    def apply(self, node, view):
        w = node.inputs[1]
        trans_b = int(node.attrs.get("transB", 0))
        out_keep, in_keep = view.keep(node.outputs[0]), view.keep(node.inputs[0])
        _take(w, out_keep, 0 if trans_b else 1)
        _take(w, in_keep, 1 if trans_b else 0)
        if len(node.inputs) > 2 and np.asarray(node.inputs[2].values).ndim >= 1 \
                and np.asarray(node.inputs[2].values).shape[-1] > 1:
            bias = node.inputs[2]
            _take(bias, out_keep, np.asarray(bias.values).ndim - 1)


@handles("MatMul")
class MatMul(Handler):
    """X·W with a constant W: [K, N]; reduces X's last axis, output channels on the last axis."""

    def propagate(self, node, b):
        a, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        space_in = b.space(a)
        if w is None or not _only_use(w) or np.asarray(w.values).ndim != 2:
            for t in node.inputs:
                if b.space(t) is not None:
                    b.lock(t, f"MatMul {node.name!r} has no constant 2-D weight")
            return
        shape_a = b.shape(a)
        if space_in is not None and (shape_a is None or space_in.axis != len(shape_a) - 1):
            b.lock(a, f"MatMul {node.name!r} reads channels on an axis it does not reduce over")
            return
        if b.new_space(y, -1) is None:
            return
        b.add_filters(node, y, np.asarray(w.values).T)

    def apply(self, node, view):
        w = node.inputs[1]
        _take(w, view.keep(node.outputs[0]), 1)
        _take(w, view.keep(node.inputs[0]), 0)


@handles("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "PRelu", "Pow")
class Elementwise(Handler):
    """Broadcasting elementwise: every operand with the full channel dim shares the output's channels."""

    def propagate(self, node, b):
        y = node.outputs[0]
        rank = len(b.shape(y) or [])
        axes = {b.space(t).axis + rank - len(b.shape(t)) for t in node.inputs if b.space(t) and b.shape(t)}
        if not axes:
            return
        if len(axes) > 1 or not rank:
            for t in node.inputs:
                if b.space(t):
                    b.lock(t, f"{node.op} {node.name!r} mixes channel axes")
            return
        axis = axes.pop()
        if b.new_space(y, axis) is None:
            return
        for t in node.inputs:
            self._couple(node, t, axis, rank, b)

    def _couple(self, node, t, axis, rank, b):
        y = node.outputs[0]
        shape = b.shape(t)
        local = axis - (rank - len(shape)) if shape is not None else -1
        full = shape is not None and 0 <= local < len(shape) and shape[local] == b.space(y).size
        if b.space(t) is not None:
            b.tie(t, y)
        elif full and (_constant(t) is None or not _only_use(t)):
            b.lock(y, f"{node.op} {node.name!r} has an operand {t.name!r} with channels from nowhere")

    def apply(self, node, view):
        y = node.outputs[0]
        indices, space = view.keep(y), view.space(y)
        if indices is None:
            return
        for t in node.inputs:
            c = _constant(t)
            if c is None:
                continue
            values = np.asarray(c.values)
            local = space.axis - (space.rank - values.ndim)
            if 0 <= local < values.ndim and values.shape[local] > 1:
                _take(c, indices, local)


@handles("Concat")
class Concat(Handler):
    """On the channel axis: output channel offset_k + i is channel i of input k."""

    def propagate(self, node, b):
        y = node.outputs[0]
        shape_y = b.shape(y)
        spaces = [b.space(t) for t in node.inputs]
        if not any(spaces) or shape_y is None:
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape_y)
        if any(s is None or s.axis != axis for s in spaces):
            for t in node.inputs:
                if b.space(t):
                    b.lock(t, f"Concat {node.name!r} joins tensors without matching channel axes")
            return
        if b.new_space(y, axis) is None:
            return
        offset = 0
        for t, s in zip(node.inputs, spaces, strict=True):
            b.tie(t, y, offset)
            offset += s.size


@handles("Flatten")
class Flatten(Handler):
    """[N, C, H, W] -> [N, C*H*W] (axis=1): feature c*HW+j belongs to channel c."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space, shape = b.space(x), b.shape(x)
        if space is None:
            return
        if int(node.attrs.get("axis", 1)) != 1 or space.axis != 1 or shape is None:
            b.lock(x, f"Flatten {node.name!r} does not start at the channel axis")
            return
        if b.new_space(y, 1) is not None:
            b.tie_block(x, y, int(np.prod(shape[2:], dtype=np.int64)))


@handles("Reshape")
class Reshape(Handler):
    """Only the flatten form [N, C, ...] -> [N, C*...] is followed; its shape constant becomes [N, -1]."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space, sx, sy = b.space(x), b.shape(x), b.shape(y)
        if space is None:
            return
        flat = sx is not None and sy is not None and len(sy) == 2 and space.axis == 1 and sy[0] == sx[0] \
            and _constant(node.inputs[1]) is not None
        if not flat:
            b.lock(x, f"Reshape {node.name!r} is not a flatten of the channel axis")
            return
        if b.new_space(y, 1) is not None:
            b.tie_block(x, y, int(np.prod(sx[2:], dtype=np.int64)))

    def apply(self, node, view):
        if view.keep(node.inputs[0]) is not None:
            shape = node.inputs[1]
            first = int(np.asarray(shape.values)[0])
            node.inputs[1] = gs.Constant(shape.name + "_pruned" if len(shape.outputs) > 1 else shape.name,
                                         np.array([first, -1], dtype=np.int64))
