"""Per-op channel handlers (one per op type, Torch-Pruning's per-layer pruners as a registry).

A handler answers two questions for its op:
  propagate(node, b): which axis of each output carries channels, and how they tie to the inputs'
                      (see irtool.analysis.channels);
  apply(node, view):  after pruning, slice the node's weights/attributes; view.keep(tensor) gives
                      the surviving channel indices of a tensor, or None when it lost none.
Adding an op is adding a handler here, not editing an if-chain.

Couplings beyond "channel i is channel i" (each stated in its handler's docstring):
  * depthwise Conv ties input g to outputs g·m .. g·m+m-1 (whole groups go, `group` shrinks); grouped
    Conv ties position p of every group together on its input and output (`group` stays);
  * GroupNormalization makes each group of C/G channels one atom (its statistics stay intact);
  * Reshape ties channel digits to one output axis (flatten, channel shuffle, attention heads);
  * MatMul of two activations keeps channels only on a shared batch axis (attention heads).
Every propagate is wrapped so that a node which reads channels but leaves an output without a channel
space locks its inputs: the analysis never loses track of channels that would then change shape silently.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channels import Builder, PruneView, Space, UnionFind

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
        lost = [y for y in node.outputs if y.name and b.space(y) is None]
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
        if space.axis != 1 or any(_constant(p) is None or not _only_use(p) for p in node.inputs[1:]) \
                or space.size % groups:
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
        for param in node.inputs[1:]:
            size = np.asarray(param.values).shape[0]
            _take(param, keep if size == space.size else kept_groups, 0)
        node.attrs["num_groups"] = len(kept_groups)


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
        if w is None or not _only_use(w) or (len(node.inputs) > 2 and _constant(node.inputs[2]) is None):
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
        b.add_filters(node, y, weights.reshape(weights.shape[0], -1))

    def apply(self, node, view):
        w = node.inputs[1]
        out_keep, in_keep = view.keep(node.outputs[0]), view.keep(node.inputs[0])
        group = int(node.attrs.get("group", 1))
        k_in, per_group = np.asarray(w.values).shape[1], np.asarray(w.values).shape[0] // group
        _take(w, out_keep, 0)
        if len(node.inputs) > 2:
            _take(node.inputs[2], out_keep, 0)
        if group > 1 and k_in == 1:
            node.attrs["group"] = int(np.asarray(w.values).shape[0]) // per_group
        elif group > 1 and in_keep is not None:
            positions = in_keep[in_keep < k_in]
            assert len(in_keep) == group * len(positions), f"grouped Conv {node.name!r}: unaligned removal"
            _take(w, positions, 1)
        else:
            _take(w, in_keep, 1)


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
    """X·W with a constant W: [K, N] reduces X's last axis; output channels on the last axis are filters.

    Two activations (attention's Q·Kᵀ and P·V): channels may only live on a broadcast batch axis
    (attention heads), where output [.., h, .., ..] depends on operand slice h alone; such a channel is
    shared by both operands and the output. Channels on one of the two matrix axes are locked: they are
    contracted or mixed, and no consumer weight could mask them.
    """

    def propagate(self, node, b):
        a, w, y = node.inputs[0], _constant(node.inputs[1]), node.outputs[0]
        if w is None and _constant(a) is None:
            self._batched(node, b)
            return
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
            if b.space(t) is None and (shape is None or (0 <= local < len(shape) and shape[local] != 1)):
                for s in spaced:
                    b.lock(s, f"MatMul {node.name!r} meets an operand {t.name!r} with channels from nowhere")
                return
        if b.new_space(y, axis) is not None:
            for t in spaced:
                b.tie(t, y)

    def apply(self, node, view):
        w = _constant(node.inputs[1])
        if w is not None and _constant(node.inputs[0]) is None:
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
    """On the channel axis: output channel offset_k + i is channel i of input k. On another axis (tokens
    joined with a class token) every input carries the same channels; a constant input is sliced."""

    def propagate(self, node, b):
        y = node.outputs[0]
        shape_y = b.shape(y)
        spaces = [b.space(t) for t in node.inputs]
        if not any(spaces) or shape_y is None:
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape_y)
        channel_axes = {s.axis for s in spaces if s is not None}
        if channel_axes == {axis} and all(spaces):
            if b.new_space(y, axis) is None:
                return
            offset = 0
            for t, s in zip(node.inputs, spaces, strict=True):
                b.tie(t, y, offset)
                offset += s.size
        elif len(channel_axes) == 1 and axis not in channel_axes \
                and all(s is not None or (_constant(t) is not None and _only_use(t))
                        for t, s in zip(node.inputs, spaces, strict=True)):
            if b.new_space(y, channel_axes.pop()) is not None:
                for t in node.inputs:
                    b.tie(t, y) if b.space(t) is not None else None
        else:
            for t in node.inputs:
                if b.space(t):
                    b.lock(t, f"Concat {node.name!r} joins tensors without matching channel axes")

    def apply(self, node, view):
        y = node.outputs[0]
        keep, space = view.keep(y), view.space(y)
        if keep is None or int(node.attrs.get("axis", 0)) % space.rank == space.axis:
            return
        for t in node.inputs:
            if _constant(t) is not None:
                _take(t, keep, space.axis)


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
    """A reshape splits or merges runs of axes. Dims shared as a leading or trailing run by input and
    output map to themselves; in between, prefix products find the run of input axes around the channel
    axis and the run of output axes holding the same elements. Within the run every element f has a
    channel digit c(f) on the input and a digit v(f) on one chosen output axis (the carrier); the
    analysis ties c(f) to v(f) for all f. Removing an atom then removes the same elements on both sides,
    in the same order, and the output stays a valid reshape with the carrier dim shrunk, so only the
    carrier entry of the shape constant is rewritten (a fresh constant; -1 and 0 entries stay):

      flatten   [N, C, H, W] -> [N, C·H·W]    c ties to c·HW .. c·HW+HW-1
      heads     [B, T, H·D] -> [B, T, H, D]   carrier H: channels h·D .. h·D+D-1 form head h
      shuffle   [N, G·K, ..] -> [N, G, K, ..] carrier K: channels g·K+p tie across g (position p)
      merge     [N, K, G, ..] -> [N, K·G, ..] p ties to p·G .. p·G+G-1 (channel shuffle, second half)

    The carrier is the output axis of the run that gives the most atoms, among those its consumers accept
    (two-activation MatMul: a batch axis, so attention keeps whole heads; InstanceNormalization: axis 1).
    """

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        run = _reshape_run(b.shape(x), b.shape(y), space.axis)
        if run is None or _constant(node.inputs[1]) is None:
            b.lock(x, f"Reshape {node.name!r} has a dynamic shape or moves the channel axis across others")
            return
        x_dims, r, y_dims, y_offset = run
        carriers = [(j, _digit_ties(x_dims, r, y_dims, j)) for j, d in enumerate(y_dims) if d > 1]
        if not carriers:
            b.lock(x, f"Reshape {node.name!r} leaves the channel axis nowhere")
            return
        accepted = [c for c in carriers if _accepts(y, y_offset + c[0], len(b.shape(y)))] or carriers
        j, (pairs, _) = max(accepted, key=lambda c: (c[1][1], -c[0]))
        if b.new_space(y, y_offset + j) is None:
            return
        sx, sy = b.space(x), b.space(y)
        for c, v in pairs:
            b.uf.union(sx.base + c, sy.base + v)

    def apply(self, node, view):
        y = node.outputs[0]
        keep, space = view.keep(y), view.space(y)
        if keep is None:
            return
        values = np.asarray(node.inputs[1].values).copy()
        if values[space.axis] > 0:
            values[space.axis] = len(keep)
            node.inputs[1] = gs.Constant(f"{node.name}_shape", values)


def _reshape_run(sx, sy, axis: int):
    """(input run dims, channel index in it, output run dims, output index of the run's first axis)."""
    if sx is None or sy is None:
        return None
    if sx and sy and not isinstance(sx[0], int) and not isinstance(sy[0], int) and axis != 0 \
            and all(isinstance(d, int) for d in list(sx[1:]) + list(sy[1:])) \
            and np.prod(sx[1:], dtype=np.int64) == np.prod(sy[1:], dtype=np.int64):
        sy = [sx[0], *sy[1:]]  # a dynamic batch under another name ([N, C, H, W] -> [-1, C·H·W])
    p = 0
    while p < min(len(sx), len(sy)) and sx[p] == sy[p] and p != axis:
        p += 1
    s = 0
    while s < min(len(sx), len(sy)) - p and sx[len(sx) - 1 - s] == sy[len(sy) - 1 - s] \
            and len(sx) - 1 - s != axis:
        s += 1
    mid_x, mid_y = list(sx[p:len(sx) - s]), list(sy[p:len(sy) - s])
    if not all(isinstance(d, int) and d > 0 for d in mid_x + mid_y):
        return None
    px, py = np.cumprod([1] + mid_x), np.cumprod([1] + mid_y)
    r = axis - p
    bounds = set(px.tolist()) & set(py.tolist())
    lo = max(v for v in bounds if v <= px[r])
    hi = min(v for v in bounds if v >= px[r + 1])
    xs = [i for i in range(len(mid_x)) if px[i] >= lo and px[i + 1] <= hi]
    ys = [j for j in range(len(mid_y)) if py[j] >= lo and py[j + 1] <= hi]
    if not ys:
        return None
    return [mid_x[i] for i in xs], r - xs[0], [mid_y[j] for j in ys], p + ys[0]


def _digit_ties(x_dims: list[int], r: int, y_dims: list[int], j: int) -> tuple[list[tuple[int, int]], int]:
    """Pairs (input channel, carrier index) sharing an element, and how many atoms they form."""
    flat = np.arange(int(np.prod(x_dims)), dtype=np.int64)
    c = flat // int(np.prod(x_dims[r + 1:])) % x_dims[r]
    v = flat // int(np.prod(y_dims[j + 1:])) % y_dims[j]
    codes = np.unique(c * y_dims[j] + v)
    pairs = [(int(k) // y_dims[j], int(k) % y_dims[j]) for k in codes]
    uf = UnionFind()
    uf.add(x_dims[r] + y_dims[j])
    for a, d in pairs:
        uf.union(a, x_dims[r] + d)
    return pairs, len({uf.find(i) for i in range(x_dims[r] + y_dims[j])})


def _accepts(tensor: gs.Tensor, axis: int, rank: int, depth: int = 4) -> bool:
    """Would the consumers of `tensor` (seen through transposes and scalings) keep channels on `axis`?"""
    for node in tensor.outputs:
        if node.op == "Transpose" and depth:
            perm = list(node.attrs.get("perm") or range(rank)[::-1])
            if not _accepts(node.outputs[0], perm.index(axis), rank, depth - 1):
                return False
        elif node.op in ("Mul", "Div") and depth and any(_constant(t) is not None for t in node.inputs):
            if not _accepts(node.outputs[0], axis, rank, depth - 1):
                return False
        elif node.op == "MatMul" and not any(_constant(t) is not None for t in node.inputs):
            if axis >= rank - 2:
                return False
        elif node.op == "InstanceNormalization" and axis != 1:
            return False
    return True


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
