"""Handlers of ops with weights: their output channels are filters (Conv, ConvTranspose, Gemm, MatMul)."""

from __future__ import annotations

import numpy as np

from irtool.analysis.channel_handlers.base import Handler, _constant, _only_use, _take, handles
from irtool.analysis.channels import Builder, Space


@handles("Conv")
class Conv(Handler):
    """W: [C_out, C_in/group, k...]; output channels are filters. Grouped convs come in two kinds:

    * depthwise (C_in/group == 1, C_out = m·group): input channel g feeds outputs g·m .. g·m+m-1, so
      they form one atom; removing it removes whole groups and `group` shrinks to the survivors;
    * grouped (C_in/group = K_in > 1, C_out/group = K_out): input channel g·K_in+p is read only by the
      outputs of group g. Removal is group-aligned: position p is tied across all groups (on the input
      and, with q, on the output), so every group keeps the same positions, W' = W[kept q of every
      group][:, kept p] stays a valid grouped kernel and `group` is unchanged.
    """

    def propagate(self, node, b):
        x, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        group = int(node.attrs.get("group", 1))
        if not _readable(w, node, b) or (len(node.inputs) > 2 and _constant(node.inputs[2]) is None):
            b.lock(x, f"Conv {node.name!r} has non-constant or shared weights") if b.space(x) else None
            return
        weights = np.asarray(w.values)
        space_in = b.space(x)
        if space_in is not None and space_in.axis != 1:
            b.lock(x, f"Conv {node.name!r} reads channels on axis {space_in.axis}")
            return
        if b.new_space(y, 1) is None:
            return
        if group > 1 and weights.shape[1] == 1:
            if space_in is None:
                b.lock(y, f"depthwise Conv {node.name!r} input has no channel space")
            else:
                b.tie_block(x, y, weights.shape[0] // group)
        elif group > 1:
            _tie_positions(b, b.space(y), group)
            if space_in is not None:
                _tie_positions(b, space_in, group)
        elif space_in is not None:
            b.add_slices(node, x, np.moveaxis(weights, 1, 0))  # a view: copying every conv weight cost time
        b.add_filters(node, y, weights.reshape(weights.shape[0], -1))

    def apply(self, node, view):
        out_keep, in_keep = view.keep(node.outputs[0]), view.keep(node.inputs[0])
        if len(node.inputs) > 2 and (bias := view.once(node, 2)) is not None:
            _take(bias, out_keep, 0)
        w = view.once(node, 1)
        if w is None:  # a tied weight another reader sliced
            return
        group = int(node.attrs.get("group", 1))
        k_in, per_group = np.asarray(w.values).shape[1], np.asarray(w.values).shape[0] // group
        _take(w, out_keep, 0)
        if group > 1 and k_in == 1:
            node.attrs["group"] = int(np.asarray(w.values).shape[0]) // per_group
        elif group > 1 and in_keep is not None:
            positions = in_keep[in_keep < k_in]
            assert len(in_keep) == group * len(positions), f"grouped Conv {node.name!r}: unaligned removal"
            _take(w, positions, 1)
        else:
            _take(w, in_keep, 1)


def _readable(w, node, b: Builder) -> bool:
    """A constant weight read by `node` alone, or tied: read at input 1 only, by nodes of `node`'s op and layout (a
    block applied several times: iterative refinement, an RNN unrolled by torch.export); then registered with
    Builder.share, which ties the readers' channels after the walk. Grouped Convs are not tied."""
    if w is None:
        return False
    if _only_use(w):
        return True
    if _layout(node)[1] != 1 or not all(_layout(r) == _layout(node) and len(r.inputs) > 1 and r.inputs[1] is w
                                         and r.inputs[0] is not w and all(t is not w for t in r.inputs[2:])
                                         for r in w.outputs):
        return False
    b.share(w, (node.inputs[0], node.outputs[0]))
    bias = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None and not _only_use(bias) \
            and all(len(r.inputs) > 2 and r.inputs[1] is w and r.inputs[2] is bias for r in bias.outputs):
        b.share(bias, (node.outputs[0],))  # the same layer's bias: sliced once with its weight
    return True


def _layout(node) -> tuple:
    """What must agree between the readers of a tied weight: the op and how it lays the weight out."""
    return node.op, int(node.attrs.get("group", 1)), int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))


def _tie_positions(b: Builder, space: Space, groups: int) -> None:
    """Tie channel g·K+p to channel p for every group g (K = size / groups): one atom per position."""
    per_group = space.size // groups
    for i in range(per_group, space.size):
        b.uf.union(space.base + i % per_group, space.base + i)


@handles("Gemm")
class Gemm(Handler):
    """Y = A·B (+C), B: [K, N] or [N, K] with transB. Output features are filters."""

    def propagate(self, node, b):
        a, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        space_in = b.space(a)
        trans_a = int(node.attrs.get("transA", 0))
        if not _readable(w, node, b) or (len(node.inputs) > 2 and _constant(node.inputs[2]) is None):
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
        if space_in is not None:
            b.add_slices(node, a, rows.T)

    def apply(self, node, view):
        w = view.once(node, 1)
        trans_b = int(node.attrs.get("transB", 0))
        out_keep, in_keep = view.keep(node.outputs[0]), view.keep(node.inputs[0])
        if w is not None:  # None: a tied weight another reader sliced
            _take(w, out_keep, 0 if trans_b else 1)
            _take(w, in_keep, 1 if trans_b else 0)
        if len(node.inputs) > 2 and np.asarray(node.inputs[2].values).ndim >= 1 \
                and np.asarray(node.inputs[2].values).shape[-1] > 1 and (bias := view.once(node, 2)) is not None:
            _take(bias, out_keep, np.asarray(bias.values).ndim - 1)


@handles("MatMul")
class MatMul(Handler):
    """X·W with a constant W: [K, N] reduces X's last axis; output channels on the last axis are filters.

    Two activations (attention's Q·Kᵀ and P·V): channels may only live on a broadcast batch axis
    (attention heads), where output [.., h, .., ..] depends on operand slice h alone; such a channel is
    shared by both operands and the output. Channels on one of the two matrix axes are locked: they are
    contracted or mixed, and no consumer weight could mask them. An operand that is a constant there (DETR's
    learned queries, whose projection and heads fold to constants [B, H, T, D] at a static batch) is sliced
    along the head axis.
    """

    def propagate(self, node, b):
        a, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        if (w is None or np.ndim(w.values) != 2) and not (w is not None and _constant(a) is not None):
            self._batched(node, b)
            return
        space_in = b.space(a)
        if not _readable(w, node, b) or np.asarray(w.values).ndim != 2:
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
        if space_in is not None:
            b.add_slices(node, a, np.asarray(w.values))

    @staticmethod
    def _batched(node, b):
        y = node.outputs[0]
        spaced = [t for t in node.inputs if b.space(t) is not None]
        rank = len(b.shape(y) or [])
        if not spaced:
            return
        axes = {b.space(t).axis + rank - b.space(t).rank for t in spaced}
        if not rank or len(axes) > 1 or any(b.space(t).axis >= b.space(t).rank - 2 for t in spaced):
            for t in spaced:
                b.lock(t, f"MatMul {node.name!r} contracts or mixes the channels of two activations")
            return
        axis = axes.pop()
        for t in node.inputs:
            shape = b.shape(t)
            local = axis - (rank - len(shape)) if shape is not None else -1
            if b.space(t) is None and _constant(t) is None \
                    and (shape is None or (0 <= local < len(shape) and shape[local] != 1)):
                for s in spaced:
                    b.lock(s, f"MatMul {node.name!r} meets an operand {t.name!r} with channels from nowhere")
                return
        if b.new_space(y, axis) is not None:
            for t in spaced:
                b.tie(t, y)

    def apply(self, node, view):
        space = view.space(node.outputs[0])
        if space is not None and space.axis < space.rank - 2:  # channels on a batch axis: slice constant operands
            keep = view.keep(node.outputs[0])
            for index, t in enumerate(node.inputs):
                local = space.axis - (space.rank - np.ndim(t.values)) if _constant(t) is not None else -1
                if keep is not None and local >= 0 and np.shape(t.values)[local] > 1:
                    _take(view.own(node, index), keep, local)
            return
        if _constant(node.inputs[1]) is not None and _constant(node.inputs[0]) is None:
            w = view.once(node, 1)
            if w is not None:  # None: a tied weight another reader sliced
                _take(w, view.keep(node.outputs[0]), 1)
                _take(w, view.keep(node.inputs[0]), 0)


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
        if space_in is not None:
            b.add_slices(node, x, weights.reshape(weights.shape[0], -1))

    def apply(self, node, view):
        w = view.own(node, 1)
        _take(w, view.keep(node.outputs[0]), 1)
        _take(w, view.keep(node.inputs[0]), 0)
        if len(node.inputs) > 2:
            _take(view.own(node, 2), view.keep(node.outputs[0]), 0)


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@handles("LSTM", "GRU", "RNN")
class Recurrent(Handler):
    """W: [D, G·H, I], R: [D, G·H, H], B: [D, 2·G·H] with G gates (LSTM 4, GRU 3, RNN 1) per direction d.
    Hidden unit h is one filter: rows g·H+h of W and R for every gate and direction. It lives on the last axis
    of Y, Y_h and Y_c (whatever the layout), of initial_h and initial_c, and in column h of R: the recurrence
    reads the hidden state. Removing it takes those rows, that column, B's entries, LSTM's peepholes P [D, 3·H]
    and hidden_size; an initial state computed at run time goes through a Gather of the kept units. The input's
    channels are W's columns (slices), on X's last axis."""

    def propagate(self, node, b):
        x, y = node.inputs[0], [t for t in node.outputs if t.name]
        space_in = b.space(x)
        params = [node.inputs[i] for i in (1, 2, 3, 7) if len(node.inputs) > i and node.inputs[i].name]
        if any(_constant(p) is None or not _only_use(p) for p in params):
            if space_in is not None:
                b.lock(x, f"{node.op} {node.name!r} has non-constant or shared weights")
            return
        if space_in is not None and space_in.axis != space_in.rank - 1:
            b.lock(x, f"{node.op} {node.name!r} reads channels on an axis it does not reduce over")
            return
        if not y or any(b.new_space(t, -1) is None for t in y):
            return
        for t in y[1:]:
            b.tie(y[0], t)
        w, r = np.asarray(node.inputs[1].values), np.asarray(node.inputs[2].values)
        b.add_filters(node, y[0], np.concatenate([_unit_rows(w, node.op), _unit_rows(r, node.op)], axis=1))
        b.add_slices(node, y[0], np.moveaxis(r, 2, 0).reshape(r.shape[2], -1))
        if space_in is not None:
            b.add_slices(node, x, np.moveaxis(w, 2, 0).reshape(w.shape[2], -1))

    def apply(self, node, view):
        hidden = int(np.asarray(node.inputs[2].values).shape[2])
        keep = view.keep(next(t for t in node.outputs if t.name))
        _take(view.own(node, 1), view.keep(node.inputs[0]), 2)
        if keep is None:
            return
        def rows(blocks: int) -> np.ndarray:  # unit h's entry in each of `blocks` stacked [H] blocks
            return np.concatenate([g * hidden + keep for g in range(blocks)])

        gates = GATES[node.op]
        _take(view.own(node, 1), rows(gates), 1)
        r = view.own(node, 2)
        _take(r, rows(gates), 1)
        _take(r, keep, 2)
        for index, blocks in ((3, 2 * gates), (7, 3)):  # B: W's and R's biases; P: LSTM's three peepholes
            if len(node.inputs) > index and node.inputs[index].name:
                _take(view.own(node, index), rows(blocks), 1)
        for index in (5, 6):  # initial_h, initial_c: [D, batch, H] or [batch, D, H]
            state = node.inputs[index] if len(node.inputs) > index else None
            if state is not None and state.name:
                if _constant(state) is not None:
                    _take(view.own(node, index), keep, -1)
                else:
                    node.inputs[index] = view.gathered(state, keep, -1)
        node.attrs["hidden_size"] = len(keep)


def _unit_rows(weights: np.ndarray, op: str) -> np.ndarray:
    """[D, G·H, K] -> [H, D·G·K]: row h holds unit h's rows of every gate and direction."""
    d, gh, k = weights.shape
    gates = GATES[op]
    return weights.reshape(d, gates, gh // gates, k).transpose(2, 0, 1, 3).reshape(gh // gates, -1)
