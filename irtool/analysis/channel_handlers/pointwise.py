"""Handlers of ops that keep channels where they are: activations, norms, elementwise, axis moves."""

from __future__ import annotations

import numpy as np

from irtool.analysis.channel_handlers.base import (
    Handler,
    _constant,
    _expanded_constant,
    _follow,
    _ints,
    _only_use,
    _own_expand,
    _slice_expanded,
    _take,
    handles,
)


@handles("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu",
         "Softplus", "Softsign", "Clip", "Identity", "Dropout", "Cast", "Neg", "Abs", "Sqrt", "Exp",
         "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "Celu", "ThresholdedRelu",
         "Shrink", "IsNaN", "IsInf", "Not",
         "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")
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
        # shared parameters are fine: apply() slices its own copy (an untrained BatchNorm's scale and variance are
        # both ones, and torch.export's optimizer stores them as one constant)
        if space.axis != 1 or any(_constant(p) is None for p in node.inputs[1:]):
            b.lock(x, f"{node.op} {node.name!r} normalizes another axis or has non-constant parameters")
            return
        if b.new_space(y, 1) is not None:
            b.tie(x, y)

    def apply(self, node, view):
        indices = view.keep(node.inputs[0])
        for index in range(1, len(node.inputs)):
            _take(view.own(node, index), indices, 0)


@handles("GroupNormalization")
class GroupNorm(Handler):
    """Statistics are taken per group of K = C/G channels, so removing part of a group would change them
    (the masking contract breaks): a group's channels form one atom, whole groups go and num_groups
    shrinks. scale/bias are per channel [C] (opset 21) or per group [G] (opset 18)."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        groups = int(node.attrs.get("num_groups", 1))
        if space.axis != 1 or any(_constant(p) is None for p in node.inputs[1:]) or space.size % groups:
            b.lock(x, f"GroupNormalization {node.name!r} normalizes another axis or has non-constant parameters")
            return
        per_group = space.size // groups
        for i in range(space.size):
            b.uf.union(space.base + i, space.base + i - i % per_group)
        if b.new_space(y, 1) is not None:
            b.tie(x, y)

    def apply(self, node, view):
        keep, space = view.keep(node.inputs[0]), view.space(node.inputs[0])
        if keep is None:
            return
        groups = int(node.attrs.get("num_groups", 1))
        kept_groups = np.unique(keep // (space.size // groups))
        for index in range(1, len(node.inputs)):
            param = view.own(node, index)
            size = np.asarray(param.values).shape[0]
            _take(param, keep if size == space.size else kept_groups, 0)
        node.attrs["num_groups"] = len(kept_groups)


@handles("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "PRelu", "Pow", "Where", "FastGelu", "BiasGelu", "QuickGelu",
         "BiasAdd", "Mod", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor")
class Elementwise(Handler):
    """Broadcasting elementwise: every operand with the full channel dim shares the output's channels. ONNX
    Runtime's FastGelu and BiasGelu (gelu(x + bias)), QuickGelu and BiasAdd (x + bias + skip) are such ops."""

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
        for index in range(len(node.inputs)):
            self._couple(node, index, axis, rank, b)

    def _couple(self, node, index, axis, rank, b):
        y, t = node.outputs[0], node.inputs[index]
        shape = b.shape(t)
        local = axis - (rank - len(shape)) if shape is not None else -1
        full = shape is not None and 0 <= local < len(shape) and shape[local] == b.space(y).size
        if b.space(t) is not None:
            b.tie(t, y)
        elif full and _constant(t) is not None and not _only_use(t):
            b.share(t, (y,))  # several nodes read it: sliced once if they keep the same channels, else copied
        elif full and _constant(t) is None and _expanded_constant(t, b, shared=True) is not None:
            b.notes.setdefault(node.name, []).append(index)  # apply slices it: learned queries plus attention
        elif full and _constant(t) is None:
            b.lock(y, f"{node.op} {node.name!r} has an operand {t.name!r} with channels from nowhere")

    def apply(self, node, view):
        y = node.outputs[0]
        indices, space = view.keep(y), view.space(y)
        if indices is None:
            return
        for index in view.graph.notes.get(node.name, []):
            _slice_expanded(_own_expand(node, index, view), view, indices, space.axis, space.rank)
        for index, t in enumerate(node.inputs):
            if _constant(t) is None:
                continue
            values = np.asarray(t.values)
            local = space.axis - (space.rank - values.ndim)
            if not (0 <= local < values.ndim and values.shape[local] > 1):
                continue
            constant = view.once(node, index)
            if constant is not None:  # None: a shared operand another reader sliced
                _take(constant, indices, local)


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
    """Reducing other axes keeps channels. A reduction over the channel axis is a statistic over them (the mean
    and variance of a LayerNorm written out): its output carries no channels, and the input's group is soft
    locked (Group.soft), as for a LayerNormalization: prune{through-norms=true} computes it over the kept ones."""

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
            b.soft_lock(x, f"{node.op} {node.name!r} reduces over the channel axis")
            b.statistic(node.outputs[0])
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


@handles("LayerNormalization", "RMSNormalization")
class LayerNorm(Handler):
    """Normalizing over other axes keeps channels. Over the channel axis the statistics change when channels go,
    which breaks the masking contract: such channels pass through under a soft lock (Group.soft), which
    prune{through-norms=true} lifts; scale and bias are then sliced and the norm covers the kept channels."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        if space.axis >= int(node.attrs.get("axis", -1)) % space.rank:
            if any(_constant(p) is None for p in node.inputs[1:] if p.name):  # shared ones are copied (own)
                b.lock(x, f"{node.op} {node.name!r} normalizes over the channel axis with non-constant parameters")
                return
            b.soft_lock(x, f"{node.op} {node.name!r} normalizes over the channel axis")
        _follow(node, b, space.axis)

    def apply(self, node, view):
        x = node.inputs[0]
        indices, space = view.keep(x), view.space(x)
        if indices is None:
            return
        for index in range(1, len(node.inputs)):
            param = node.inputs[index]
            shape = np.asarray(param.values).shape if param.name else ()
            local = space.axis - space.rank + len(shape)  # scale and bias broadcast against x from the right
            if local >= 0 and shape[local] > 1:
                _take(view.own(node, index), indices, local)
