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


@handles("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "PRelu", "Pow", "Where")
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
        if int(node.attrs.get("axis", 1)) != 1 or space.axis != 1 or shape is None \
                or not all(isinstance(d, int) for d in shape[1:]):
            b.lock(x, f"Flatten {node.name!r} does not start at the channel axis or has dynamic spatial dims")
            return
        if b.new_space(y, 1) is not None:
            b.tie_block(x, y, int(np.prod(shape[2:], dtype=np.int64)))


@handles("Reshape")
class Reshape(Handler):
    """Only the flatten form [N, C, ...] -> [N, C*...] is followed; an explicit feature count in its
    shape constant is rewritten to the surviving channels times the block size."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space, sx, sy = b.space(x), b.shape(x), b.shape(y)
        if space is None:
            return
        flat = sx is not None and sy is not None and len(sy) == 2 and space.axis == 1 \
            and all(isinstance(d, int) for d in sx[1:]) and sy[1] == int(np.prod(sx[1:], dtype=np.int64)) \
            and _constant(node.inputs[1]) is not None and len(np.asarray(node.inputs[1].values)) == 2
        if not flat:
            b.lock(x, f"Reshape {node.name!r} is not a flatten of the channel axis")
            return
        if b.new_space(y, 1) is not None:
            b.tie_block(x, y, int(np.prod(sx[2:], dtype=np.int64)))

    def apply(self, node, view):
        keep, space = view.keep(node.inputs[0]), view.space(node.inputs[0])
        values = np.asarray(node.inputs[1].values).copy()
        if keep is None or values[1] == -1:
            return
        values[1] = len(keep) * (int(values[1]) // space.size)
        node.inputs[1] = gs.Constant(f"{node.name}_shape", values)


def _ints(node: gs.Node, attr: str, input_index: int) -> list[int] | None:
    """An int-list operand given as attribute (older opsets) or as constant input (newer ones)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        c = _constant(node.inputs[input_index])
        return None if c is None else [int(v) for v in np.asarray(c.values).reshape(-1)]
    return []


def _follow(node: gs.Node, b: Builder, out_axis: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if b.new_space(y, out_axis) is not None:
        b.tie(x, y)


@handles("Transpose")
class Transpose(Handler):
    """The channel axis moves to perm.index(axis)."""

    def propagate(self, node, b):
        space = b.space(node.inputs[0])
        if space is None:
            return
        perm = node.attrs.get("perm") or list(range(space.rank))[::-1]
        _follow(node, b, list(perm).index(space.axis))


@handles("Squeeze", "Unsqueeze")
class SqueezeUnsqueeze(Handler):
    """Axes are removed or inserted around the channel axis, which keeps its size."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        axes, rank_y = _ints(node, "axes", 1), len(b.shape(y) or [])
        if axes is None or not rank_y:
            b.lock(x, f"{node.op} {node.name!r} has unknown axes")
            return
        if node.op == "Squeeze":
            axes = [a % space.rank for a in axes] or [i for i, d in enumerate(b.shape(x)) if d == 1]
            if space.axis in axes:
                b.lock(x, f"Squeeze {node.name!r} removes the channel axis")
                return
            _follow(node, b, space.axis - sum(1 for a in axes if a < space.axis))
        else:
            inserted = sorted(a % rank_y for a in axes)
            kept = [i for i in range(rank_y) if i not in inserted]
            _follow(node, b, kept[space.axis])


@handles("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd")
class Reduce(Handler):
    """Reducing other axes keeps channels; reducing the channel axis mixes them (locked)."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        axes = _ints(node, "axes", 1)
        if axes is None:
            b.lock(x, f"{node.op} {node.name!r} has unknown axes")
            return
        axes = [a % space.rank for a in axes] or list(range(space.rank))
        if space.axis in axes:
            b.lock(x, f"{node.op} {node.name!r} reduces over the channel axis")
            return
        keepdims = int(node.attrs.get("keepdims", 1))
        _follow(node, b, space.axis if keepdims else space.axis - sum(1 for a in axes if a < space.axis))


@handles("Softmax", "LogSoftmax")
class Softmax(Handler):
    """Softmax over another axis keeps channels; over the channel axis it mixes them (locked)."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        if int(node.attrs.get("axis", -1)) % space.rank == space.axis:
            b.lock(x, f"{node.op} {node.name!r} normalizes over the channel axis")
            return
        _follow(node, b, space.axis)


@handles("Pad")
class Pad(Handler):
    """Padding spatial axes keeps channels; padding the channel axis is locked."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        pads = _ints(node, "pads", 1)
        axes = _ints(node, "axes", 3) or list(range(space.rank))
        if pads is None:
            b.lock(x, f"Pad {node.name!r} has non-constant pads")
            return
        per_axis = dict(zip([a % space.rank for a in axes], zip(pads[: len(axes)], pads[len(axes):], strict=True),
                            strict=True))
        if any(per_axis.get(space.axis, (0, 0))):
            b.lock(x, f"Pad {node.name!r} pads the channel axis")
            return
        _follow(node, b, space.axis)


@handles("LayerNormalization")
class LayerNorm(Handler):
    """Normalizing over other axes keeps channels. Over the channel axis the statistics would change
    when channels go, which breaks the masking contract, so such groups are locked."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        if space.axis >= int(node.attrs.get("axis", -1)) % space.rank:
            b.lock(x, f"LayerNormalization {node.name!r} normalizes over the channel axis")
            return
        _follow(node, b, space.axis)


@handles("Split")
class Split(Handler):
    """On the channel axis: channel i of output k is input channel offset_k + i; sizes are rewritten."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        axis = int(node.attrs.get("axis", 0)) % space.rank
        if axis != space.axis:
            for y in node.outputs:
                if b.new_space(y, space.axis) is not None:
                    b.tie(y, x)
            return
        offset = 0
        for y in node.outputs:
            new = b.new_space(y, axis)
            if new is None:
                return
            b.tie(y, x, offset)
            offset += new.size

    def apply(self, node, view):
        space = view.space(node.inputs[0])
        if space is None or int(node.attrs.get("axis", 0)) % space.rank != space.axis \
                or view.keep(node.inputs[0]) is None:
            return
        sizes = [len(view.keep(y)) if view.keep(y) is not None else view.space(y).size for y in node.outputs]
        node.attrs.pop("num_outputs", None)
        split = gs.Constant(f"{node.name}_split", np.asarray(sizes, dtype=np.int64))
        if len(node.inputs) > 1:
            node.inputs[1] = split
        else:
            node.inputs.append(split)


@handles("Slice")
class Slice(Handler):
    """A unit-step slice of the channel axis: output channel i is input channel start + i.
    After pruning, the bounds become the positions of the surviving channels."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        bounds = self._bounds(node, space)
        if bounds is None:
            b.lock(x, f"Slice {node.name!r} has non-constant or strided bounds on the channel axis")
            return
        if bounds == "other":
            _follow(node, b, space.axis)
            return
        if b.new_space(y, space.axis) is not None:
            b.tie(y, x, bounds[0])

    @staticmethod
    def _bounds(node, space):
        starts, ends = _ints(node, "starts", 1), _ints(node, "ends", 2)
        axes, steps = _ints(node, "axes", 3), _ints(node, "steps", 4)
        if starts is None or ends is None or axes is None or steps is None:
            return None
        axes = [a % space.rank for a in (axes or range(len(starts)))]
        if space.axis not in axes:
            return "other"
        k = axes.index(space.axis)
        if steps and steps[k] != 1:
            return None
        start = min(max(starts[k] + space.size if starts[k] < 0 else starts[k], 0), space.size)
        end = min(max(ends[k] + space.size if ends[k] < 0 else ends[k], 0), space.size)
        return start, end

    def apply(self, node, view):
        x = node.inputs[0]
        space, keep = view.space(x), view.keep(x)
        bounds = self._bounds(node, space) if space is not None else None
        if keep is None or not isinstance(bounds, tuple):
            return
        new_start = int(np.sum(keep < bounds[0]))
        new_end = new_start + int(np.sum((keep >= bounds[0]) & (keep < bounds[1])))
        axes = _ints(node, "axes", 3) or list(range(len(_ints(node, "starts", 1))))
        k = [a % space.rank for a in axes].index(space.axis)
        for index, value in ((1, new_start), (2, new_end)):
            values = np.asarray(node.inputs[index].values).copy()
            values[k] = value
            node.inputs[index] = gs.Constant(f"{node.name}_{'starts' if index == 1 else 'ends'}", values)


@handles("ConvTranspose")
class ConvTranspose(Handler):
    """W: [C_in, C_out/groups, k...]; output channel j is the filter W[:, j] (group 1 only)."""

    def propagate(self, node, b):
        x, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        space_in = b.space(x)
        if w is None or not _only_use(w) or int(node.attrs.get("group", 1)) != 1 \
                or (space_in is not None and space_in.axis != 1):
            if space_in is not None:
                b.lock(x, f"ConvTranspose {node.name!r} is grouped or has non-constant weights")
            return
        if b.new_space(y, 1) is None:
            return
        weights = np.asarray(w.values)
        b.add_filters(node, y, np.moveaxis(weights, 1, 0).reshape(weights.shape[1], -1))

    def apply(self, node, view):
        w = node.inputs[1]
        _take(w, view.keep(node.outputs[0]), 1)
        _take(w, view.keep(node.inputs[0]), 0)
        if len(node.inputs) > 2:
            _take(node.inputs[2], view.keep(node.outputs[0]), 0)
