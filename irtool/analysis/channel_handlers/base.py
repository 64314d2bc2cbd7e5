"""Base of the channel handlers: the registry, the Handler class and small helpers they share."""

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
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "propagate" in cls.__dict__:
            cls.propagate = _losing_track_locks(cls.__dict__["propagate"])

    def propagate(self, node: gs.Node, b: Builder) -> None:
        raise NotImplementedError

    def apply(self, node: gs.Node, view: PruneView) -> None:
        """Default: the node has no weights of its own; shapes follow its inputs."""


def _losing_track_locks(propagate):
    """Channels must never flow where the analysis stops following them: when a node reads a channel
    space and one of its outputs got none (a shape inference could not give, an unsupported form), the
    inputs are locked, with the reason recorded for that output if there is one."""

    def guarded(self, node: gs.Node, b: Builder) -> None:
        propagate(self, node, b)
        lost = [y for y in node.outputs if y.name and b.space(y) is None and y.name not in b.statistics]
        if lost:
            reason = b.tensor_locks.get(lost[0].name) or f"{node.op} {node.name!r} output {lost[0].name!r} has no " \
                                                            "channel space"
            for t in node.inputs:
                if b.space(t) is not None:
                    b.lock(t, reason if reason.startswith(node.op) else f"{node.op} {node.name!r}: {reason}")

    guarded.__doc__ = propagate.__doc__
    return guarded


def _constant(tensor: gs.Tensor) -> gs.Constant | None:
    return tensor if isinstance(tensor, gs.Constant) else None


def _take(constant: gs.Constant, indices: np.ndarray | None, axis: int) -> None:
    if indices is not None:
        constant.values = np.ascontiguousarray(np.take(np.asarray(constant.values), indices, axis=axis))


def _only_use(constant: gs.Constant) -> bool:
    """Weights shared by several nodes cannot be sliced for one of them."""
    return len(constant.outputs) <= 1


def _expanded_constant(tensor: gs.Tensor, b: Builder, shared: bool = False) -> gs.Node | None:
    """The Expand node when `tensor` is Expand(constant, shape), read by one node (any number if `shared`: see
    `_own_expand`), the constant by the Expand alone, and the shape a vector of the output's rank: a class token
    broadcast to a batch known only at run time (cls.expand(B, -1, -1) with a dynamic batch), DETR's learned
    queries. `_slice_expanded` slices it like a constant."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op != "Expand" or (len(tensor.outputs) != 1 and not shared):
        return None
    constant, out, shape = _constant(producer.inputs[0]), b.shape(tensor), b.shape(producer.inputs[1])
    if constant is None or not _only_use(constant) or out is None or shape != [len(out)]:
        return None
    return producer


def _own_expand(node: gs.Node, index: int, view: PruneView) -> gs.Node:
    """The Expand behind node.inputs[index], first copied (with its constant) for this node alone when other nodes
    read its output: DETR's queries are the decoder's first input and its residual, and only the residual Add
    keeps the pruned channels."""
    tensor = node.inputs[index]
    expand = tensor.inputs[0]
    if len(tensor.outputs) == 1:
        return expand
    constant = expand.inputs[0]
    out = gs.Variable(view.unique(tensor.name), dtype=tensor.dtype, shape=tensor.shape)
    copy = gs.Node("Expand", view.unique(expand.name), outputs=[out],
                   inputs=[gs.Constant(view.unique(constant.name), np.array(constant.values)), expand.inputs[1]])
    view.new_nodes.append(copy)
    node.inputs[index] = out
    return copy


def _slice_expanded(expand: gs.Node, view: PruneView, indices: np.ndarray, axis: int, rank: int) -> None:
    """Keep `indices` along `axis` of an `_expanded_constant`'s output (of `rank` dims): the constant is sliced
    (unless it broadcasts along the axis), and the shape's entry for the axis becomes the kept count: shape *
    (1 - onehot) + count * onehot, as the shape is computed at run time (for a constant one, cleanup folds it)."""
    constant = view.own(expand, 0)
    local = axis - (rank - np.ndim(constant.values))
    if 0 <= local and np.shape(constant.values)[local] > 1:
        _take(constant, indices, local)
    _set_target_entry(expand, view, axis, rank, len(indices))


def _set_target_entry(expand: gs.Node, view: PruneView, axis: int, rank: int, value: int, index: int = 1) -> None:
    """Entry `axis` of a shape operand (an Expand's target, input `index`, of `rank` entries) becomes `value`: in a
    fresh constant, or, for a shape computed at run time, as shape * (1 - onehot) + value * onehot."""
    name, shape = expand.name, expand.inputs[index]
    onehot = np.eye(rank, dtype=np.int64)[axis]
    if _constant(shape) is not None:
        expand.inputs[index] = gs.Constant(view.unique(f"{name}_shape"), np.asarray(shape.values) * (1 - onehot)
                                           + value * onehot)
        return
    others = gs.Variable(view.unique(f"{name}_other_dims"), dtype=np.int64)
    target = gs.Variable(view.unique(f"{name}_shape"), dtype=np.int64)
    view.new_nodes += [
        gs.Node("Mul", view.unique(f"{name}_other_dims"),
                inputs=[shape, gs.Constant(view.unique(f"{name}_mask"), 1 - onehot)], outputs=[others]),
        gs.Node("Add", view.unique(f"{name}_kept_dim"),
                inputs=[others, gs.Constant(view.unique(f"{name}_count"), onehot * value)], outputs=[target])]
    expand.inputs[index] = target


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
