"""Handlers of ops that move channels between tensors: Concat, Split, Slice, Flatten, Reshape, pixel shuffles."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channel_handlers.base import (
    Handler,
    _constant,
    _expanded_constant,
    _follow,
    _ints,
    _only_use,
    _set_target_entry,
    _slice_expanded,
    _take,
    handles,
)
from irtool.analysis.channels import Space, UnionFind


@handles("Concat")
class Concat(Handler):
    """On the channel axis: output channel offset_k + i is channel i of input k. On another axis (tokens
    joined with a class token) every input carries the same channels; a constant input is sliced, and so is a
    constant broadcast by Expand (a class token expanded to a batch known at run time)."""

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
                and all(s is not None or (_constant(t) is not None and _only_use(t)) or _expanded_constant(t, b)
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
        for index, t in enumerate(node.inputs):
            if _constant(t) is not None:
                _take(view.own(node, index), keep, space.axis)
            elif view.space(t) is None and t.inputs and t.inputs[0].op == "Expand":  # passed _expanded_constant
                _slice_expanded(t.inputs[0], view, keep, space.axis, space.rank)


@handles("Flatten")
class Flatten(Handler):
    """[N, C, H, W] -> [N, C*H*W] (axis=1): feature c*HW+j belongs to channel c. Flattening from the channel axis
    on is the same at any axis: LeViT's BatchNorm1d over tokens flattens [B, N, C] to [B*N, C] (axis=2)."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space, shape = b.space(x), b.shape(x)
        if space is None:
            return
        if int(node.attrs.get("axis", 1)) % space.rank != space.axis or shape is None \
                or not all(isinstance(d, int) for d in shape[space.axis:]):
            b.lock(x, f"Flatten {node.name!r} does not start at the channel axis or has dynamic spatial dims")
            return
        if b.new_space(y, 1) is not None:
            b.tie_block(x, y, int(np.prod(shape[space.axis + 1:], dtype=np.int64)))


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
        source = _shape_source(node.inputs[1], b)
        sized: list[gs.Tensor] = []  # tensors whose channel count the target reads at its carrier entry
        if not self._follow(node, b, source, sized) and source is not None and b.space(source) is not None:
            b.lock(source, f"Reshape {node.name!r} reshapes to the shape of {source.name!r} but cannot carry its "
                           "channels")
        for t in _channel_counts_read(node, b):  # the Shape handler left these to this one
            if not any(t is s for s in sized):
                b.lock(t, f"Reshape {node.name!r} reads the channel count of {t.name!r} into its target")

    def _follow(self, node, b, source: gs.Tensor | None, sized: list[gs.Tensor]) -> bool:
        """Tie the output's channels to the input's; False where the output carries none (input locked, or none)."""
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return False
        run = _reshape_run(b.shape(x), b.shape(y), space.axis)
        pieces = None if _constant(node.inputs[1]) is not None or source else _shape_pieces(node.inputs[1], b)
        if run is None or (_constant(node.inputs[1]) is None and pieces is None and source is None):
            b.lock(x, f"Reshape {node.name!r} {_unfollowed(b.shape(x), b.shape(y), space, run)}")
            return False
        x_dims, r, y_dims, y_offset = run
        roots = [b.uf.find(space.base + c) for c in range(space.size)]
        carriers = [(j, _digit_ties(x_dims, r, y_dims, j, roots)) for j, d in enumerate(y_dims) if d > 1]
        if not carriers:
            b.lock(x, f"Reshape {node.name!r} leaves the channel axis nowhere")
            return False
        accepted = [c for c in carriers if _accepts(y, y_offset + c[0], len(b.shape(y)), b.shape)]
        if not accepted:
            b.lock(x, f"Reshape {node.name!r} leaves the channels on axes its consumers contract or mix")
            return False
        j, (pairs, _) = max(accepted, key=lambda c: (c[1][1], -c[0]))
        twin = None
        if pieces is not None:
            entry = _runtime_entry(node, pieces, y_offset + j, space, pairs, b)
            if entry is None:
                b.lock(x, f"Reshape {node.name!r} computes the channel entry of its shape at run time")
                return False
            kind, value = entry
            if kind in ("own", "scaled"):  # follows by itself at run time
                sized.append(x if value is None else value)
            elif kind == "twin":
                twin = value
            else:  # a constant piece (index, offset) or (BATCH_TIMES, piece, B) for apply to rewrite
                b.notes[node.name] = value
        if source is not None and (b.space(source) is None or b.space(source).axis != y_offset + j
                                   or b.space(source).size != b.shape(y)[y_offset + j]):
            b.lock(x, f"Reshape {node.name!r} takes its shape from {source.name!r}, whose channels are elsewhere")
            return False
        if b.new_space(y, y_offset + j) is None:
            return False
        sx, sy = b.space(x), b.space(y)
        for c, v in pairs:
            b.uf.union(sx.base + c, sy.base + v)
        if source is not None:  # y has source's shape, read at run time: both keep the same channels
            b.tie(source, y)
        if twin is not None:
            b.tie(twin, y)
            sized.append(twin)
        return True

    def apply(self, node, view):
        y = node.outputs[0]
        keep, space = view.keep(y), view.space(y)
        if keep is None:
            return
        note = view.graph.notes.get(node.name)
        if note is not None and note[0] == BATCH_TIMES:
            self._rewrite_scale(node, view, note[1], note[2], len(keep))
            return
        if note is not None:
            self._rewrite_piece(node, view, *note, len(keep))
            return
        if _constant(node.inputs[1]) is None:  # the channel entry is read off the input's own shape
            return
        values = np.asarray(node.inputs[1].values).copy()
        if values[space.axis] > 0:
            values[space.axis] = len(keep)
            node.inputs[1] = gs.Constant(f"{node.name}_shape", values)

    @staticmethod
    def _rewrite_scale(node, view, index: int, batch: int, kept: int) -> None:
        """The carrier entry is batch · k at run time (torch's legacy nn.MultiheadAttention: B · num_heads): k
        becomes the kept count per batch item. The q, k and v reshapes share that Mul and rewrite it alike."""
        mul, slot = _scaled_piece(node, index)
        dtype = np.asarray(mul.inputs[slot].values).dtype
        mul.inputs[slot] = gs.Constant(view.unique(f"{mul.name}_factor"), np.array(kept // batch, dtype))

    @staticmethod
    def _rewrite_piece(node, view, index: int, offset: int, kept: int) -> None:
        """The target is Concat(pieces): its carrier entry sits in constant piece `index`. A Concat that other
        nodes read too is copied for this reshape first."""
        concat = node.inputs[1].inputs[0]
        values = np.asarray(concat.inputs[index].values).copy()
        if values[offset] <= 0:  # -1 or 0: ONNX Runtime works it out
            return
        values[offset] = kept
        if len(node.inputs[1].outputs) > 1:
            target = gs.Variable(view.unique(f"{node.name}_shape"), dtype=np.int64)
            concat = gs.Node("Concat", view.unique(f"{node.name}_shape_concat"), attrs=dict(concat.attrs),
                             inputs=list(concat.inputs), outputs=[target])
            view.new_nodes.append(concat)
            node.inputs[1] = target
        concat.inputs[index] = gs.Constant(view.unique(f"{node.name}_shape_piece"), values)


BATCH_TIMES = "batch-times"  # a note: the carrier entry is batch · k at run time (Reshape._rewrite_scale)


def _shape_source(shape: gs.Tensor, b) -> gs.Tensor | None:
    """src when a reshape target is Shape(src), whole: a decomposed GroupNorm (torch's legacy export) reshapes its
    normalized groups back to the input's own shape."""
    producer = shape.inputs[0] if shape.inputs else None
    if producer is None or producer.op != "Shape" or int(producer.attrs.get("start", 0)) != 0 \
            or "end" in producer.attrs:
        return None
    return producer.inputs[0]


def _shape_pieces(shape: gs.Tensor, b) -> list[tuple[int, gs.Tensor]] | None:
    """A reshape target built at run time as Concat (axis 0) of 1-D pieces (a dynamic batch read off Shape, then
    constants): (first entry, piece) for each; None for any other form."""
    producer = shape.inputs[0] if shape.inputs else None
    if producer is None or producer.op != "Concat" or int(producer.attrs.get("axis", 0)) != 0:
        return None
    pieces, start = [], 0
    for piece in producer.inputs:
        length = _length(piece, b)
        if length is None:
            return None
        pieces.append((start, piece))
        start += length
    return pieces


def _shape_read(piece: gs.Tensor, offset: int, b) -> tuple[gs.Tensor, int] | None:
    """(t, dim of t) that entry `offset` of a target piece copies, when the piece is Slice(Shape(t)) (unit
    step, constant bounds) or Gather(Shape(t), constant); None otherwise."""
    producer = piece.inputs[0] if piece.inputs else None
    while producer is not None and producer.op in ("Squeeze", "Unsqueeze") and producer.inputs[0].inputs:
        producer = producer.inputs[0].inputs[0]  # a picked dim made a scalar and back (_past_rank_moves)
    if producer is None or not producer.inputs:
        return None
    if producer.op == "Shape":  # Shape(t, start, end) as a piece itself (torch.export)
        dims = b.shape(producer.inputs[0])
        start = int(producer.attrs.get("start", 0)) % max(len(dims), 1) if dims is not None else None
        return None if start is None else (producer.inputs[0], start + offset)
    shape = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
    if shape is None or shape.op != "Shape" or int(shape.attrs.get("start", 0)) != 0:
        return None
    source = shape.inputs[0]
    dims = b.shape(source)
    if dims is None:
        return None
    rank = len(dims)
    if producer.op == "Gather" and _constant(producer.inputs[1]) is not None:
        picked = np.asarray(producer.inputs[1].values).reshape(-1)
        return (source, int(picked[offset]) % rank) if offset < picked.size else None
    bounds = _vector_slice(producer, rank) if producer.op == "Slice" else None
    return (source, bounds[0] + offset) if bounds is not None else None


def _runtime_entry(node: gs.Node, pieces, axis: int, space, pairs, b) -> tuple[str, object] | None:
    """How the carrier entry (output axis `axis`) of a target built at run time follows the pruning, or None (lock):
    ("own", None), x's own channel count read off Shape(x) (x.flatten(2)); ("twin", t), that of a tensor t with its
    channels on that dim, which y's then tie to (torch.export's kᵀ in attention reshapes back to Shape(k)[:2] =
    [B, H]); ("note", ...), a constant piece or a run-time B · k (Reshape.apply rewrites either)."""
    x, y = node.inputs[0], node.outputs[0]
    piece = _piece_at(pieces, axis, b)
    if piece is None:
        return None
    size = b.shape(y)[axis]
    read = _shape_read(pieces[piece[0]][1], piece[1], b)
    if read is not None and read[0] is x and read[1] == space.axis and size == space.size:
        return "own", None
    scaled = _own_scaled(node, piece[0], space, size, b)
    if scaled is not None:
        return "scaled", scaled
    if read is not None and _carries(b, read, size):
        return "twin", read[0]
    if _constant(pieces[piece[0]][1]) is not None:
        return "note", piece
    batch = _batch_times(node, piece[0], b, size, pairs)
    return None if batch is None else ("note", (BATCH_TIMES, piece[0], batch))


def _piece_at(pieces, entry: int, b) -> tuple[int, int] | None:
    """(index of the piece holding entry `entry` of a target built at run time, offset of the entry in it)."""
    return next(((k, entry - start) for k, (start, t) in enumerate(pieces) if start <= entry < start + _length(t, b)),
                None)


def _scaled_piece(node: gs.Node, index: int) -> tuple[gs.Node, int] | None:
    """(Mul, index of its scalar constant) when piece `index` of the Concat target of `node` is Unsqueeze(Mul(s, k))
    with k a scalar integer constant."""
    concat = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if concat is None or concat.op != "Concat" or index >= len(concat.inputs):
        return None
    unsqueeze = concat.inputs[index].inputs[0] if concat.inputs[index].inputs else None
    if unsqueeze is None or unsqueeze.op != "Unsqueeze" or not unsqueeze.inputs[0].inputs:
        return None
    mul = unsqueeze.inputs[0].inputs[0]
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    slots = [i for i, t in enumerate(mul.inputs) if _constant(t) is not None and np.asarray(t.values).size == 1
             and np.asarray(t.values).dtype.kind == "i"]
    return (mul, slots[0]) if len(slots) == 1 else None


def _own_scaled(node: gs.Node, index: int, space, size, b) -> gs.Tensor | None:
    """t when target piece `index` of `node` is the reshaped tensor's own channel count times k, read as
    Unsqueeze(Mul(Gather(Shape(t), axis), k)) off a t whose channels are the same atoms. Llama's repeat_kv merges each
    k/v head with its k copies, reshape(B, n_kv * k, T, D) with n_kv = t.shape[1] at run time (torch's legacy exporter
    with dynamic axes): the entry then follows the pruning by itself."""
    read = _scaled_read(node, index, b)
    if read is None:
        return None
    t, factor = read
    other = b.space(t)
    same = other.size == space.size and other.size * factor == size \
        and all(b.uf.find(other.base + i) == b.uf.find(space.base + i) for i in range(space.size))
    return t if same else None


def _scaled_read(node: gs.Node, index: int, b) -> tuple[gs.Tensor, int] | None:
    """(t, k) when target piece `index` of `node` is Unsqueeze(Mul(Gather(Shape(t), axis), k)) and axis is t's channel
    axis."""
    scaled = _scaled_piece(node, index)
    read = None if scaled is None else _shape_read(scaled[0].inputs[1 - scaled[1]], 0, b)
    space = None if read is None else b.space(read[0])
    if space is None or space.axis != read[1]:
        return None
    return read[0], int(np.asarray(scaled[0].inputs[scaled[1]].values).reshape(-1)[0])


def _batch_times(node: gs.Node, index: int, b, size, pairs: list[tuple[int, int]]) -> int | None:
    """B when target piece `index` of `node` is Unsqueeze(Mul(Gather(Shape(t), i), k)) with t's dim i a static B at
    the analysis's shapes (the stand-in batch) that is no channel count, size == B · k, and the carrier's channels
    (`pairs`) repeat with period k along it (heads folded into the batch: element b·k + h is head h): k then becomes
    the kept count per batch item. None otherwise."""
    scaled = _scaled_piece(node, index)
    if scaled is None:
        return None
    mul, slot = scaled
    factor = int(np.asarray(mul.inputs[slot].values).reshape(-1)[0])
    gather = mul.inputs[1 - slot].inputs[0] if mul.inputs[1 - slot].inputs else None
    if gather is None or gather.op != "Gather" or _constant(gather.inputs[1]) is None \
            or not gather.inputs[0].inputs or gather.inputs[0].inputs[0].op != "Shape":
        return None
    source = gather.inputs[0].inputs[0].inputs[0]
    dims, space = b.shape(source), b.space(source)
    if not dims:
        return None
    axis = int(np.asarray(gather.inputs[1].values).reshape(-1)[0]) % len(dims)
    if not isinstance(dims[axis], int) or (space is not None and space.axis == axis):
        return None
    batch = dims[axis]
    return batch if factor >= 1 and batch * factor == size and _periodic(pairs, factor, batch) else None


def _periodic(pairs: list[tuple[int, int]], period: int, repeats: int) -> bool:
    """Do the (channel, carrier index) pairs repeat with `period` along the carrier, `repeats` times?"""
    base = {(c, v % period) for c, v in pairs}
    return set(pairs) == {(c, h + m * period) for c, h in base for m in range(repeats)}


def _channel_counts_read(node: gs.Node, b) -> list[gs.Tensor]:
    """Tensors whose channel count a run-time target of `node` copies (the reshaped one's own too)."""
    pieces = _shape_pieces(node.inputs[1], b) if node.op == "Reshape" and len(node.inputs) > 1 else None
    found = []
    for index, (_, piece) in enumerate(pieces or []):
        for offset in range(_length(piece, b) or 0):
            read = _shape_read(piece, offset, b)
            space = None if read is None else b.space(read[0])
            if space is not None and _carries(b, read, space.size):
                found.append(read[0])
        scaled = _scaled_read(node, index, b)  # a count times k (repeat_kv)
        if scaled is not None:
            found.append(scaled[0])
    return found


def _carries(b, read: tuple[gs.Tensor, int], size) -> bool:
    """Whether tensor read[0] has its channels on dim read[1], `size` of them."""
    space = b.space(read[0])
    return space is not None and space.axis == read[1] and space.size == size


def _vector_slice(node: gs.Node, length: int) -> tuple[int, int] | None:
    """(start, end) of a unit-step Slice with constant bounds of a vector of `length` entries (a shape)."""
    bounds = Slice._bounds(node, Space(0, length, 0, 1))
    return bounds if isinstance(bounds, tuple) else None


def _length(piece: gs.Tensor, b) -> int | None:
    dims = b.shape(piece)
    return dims[0] if dims is not None and len(dims) == 1 and isinstance(dims[0], int) else None


def _unfollowed(sx, sy, space: Space, run) -> str:
    """Why a Reshape's channels cannot be followed, for the lock reason."""
    if sx is None or sy is None:
        return "has an input or output shape that shape inference could not give"
    if run is None and space.size == 1:
        return "drops the channel axis, which holds a single channel"
    if run is None and not all(isinstance(d, int) for d in list(sx[1:]) + list(sy[1:])):  # past a dynamic batch
        return "has dims shape inference left unknown (a target computed at run time)"
    if run is None:
        return "moves the channel axis across others"
    return "computes its target shape at run time in a form the analysis cannot follow"


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
    unknown = [j for j, d in enumerate(mid_y) if not isinstance(d, int)]
    if len(unknown) == 1 and all(isinstance(d, int) and d > 0 for d in mid_x):
        # a -1 that inference left symbolic behind a dynamic batch ([N, C, H, W] -> [N, C, -1]): the runs
        # around hold the same elements, so it is what the rest of the middle leaves
        known = int(np.prod([d for d in mid_y if isinstance(d, int)], dtype=np.int64))
        total = int(np.prod(mid_x, dtype=np.int64))
        if known > 0 and total % known == 0:
            mid_y[unknown[0]] = total // known
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


def _digit_ties(x_dims: list[int], r: int, y_dims: list[int], j: int,
                roots: list[int] | None = None) -> tuple[list[tuple[int, int]], int]:
    """Pairs (input channel, carrier index) sharing an element, and how many atoms they form with the ties the
    input channels already have (`roots`: each channel's atom; heads folded into the batch tie head h of every
    batch, so unfolding that axis on the batch digit would merge all heads)."""
    flat = np.arange(int(np.prod(x_dims)), dtype=np.int64)
    c = flat // int(np.prod(x_dims[r + 1:])) % x_dims[r]
    v = flat // int(np.prod(y_dims[j + 1:])) % y_dims[j]
    codes = np.unique(c * y_dims[j] + v)
    pairs = [(int(k) // y_dims[j], int(k) % y_dims[j]) for k in codes]
    uf = UnionFind()
    uf.add(x_dims[r] + y_dims[j])
    for a, d in pairs:
        uf.union(a, x_dims[r] + d)
    first: dict[int, int] = {}
    for c, root in enumerate(roots or []):
        uf.union(c, first.setdefault(root, c))
    return pairs, len({uf.find(i) for i in range(x_dims[r] + y_dims[j])})


def _accepts(tensor: gs.Tensor, axis: int, rank: int, shape, depth: int = 16, memo: dict | None = None) -> bool:
    """Would the consumers of `tensor` (seen through transposes, elementwise ops, reshapes and picks along other
    axes) keep channels on `axis`? A reshape passes the axis on to the output axes of its run (any of them may
    carry it): nn.MultiheadAttention folds heads into the batch ([T, B, H·D] -> [T, B·H, D]) and unfolds them
    ([B·H, T, D] -> [B, H, T, D]) before the score MatMul, where only the head axis keeps channels, not D. A fused
    qkv projection ([B, T, 3·H·D] -> [3, B, H, T, D], timm's ViT and Swin) reaches it through a Gather, or
    Split/Slice and Squeeze (unbind), on the leading axis; Llama's k reaches it through RoPE's rotate-half,
    grouped-query attention's Expand, and with the dynamo exporter a fold into the batch and back. `memo` holds
    the answers per (tensor, axis): those paths meet again."""
    memo = {} if memo is None else memo
    key = (tensor.name, axis, rank)
    if key not in memo:
        memo[key] = True  # a path back to this tensor decides nothing
        memo[key] = _consumers_accept(tensor, axis, rank, shape, depth, memo)
    return memo[key]


def _consumers_accept(tensor: gs.Tensor, axis: int, rank: int, shape, depth: int, memo: dict) -> bool:
    for node in tensor.outputs:
        if node.op == "Reshape" and node.inputs[0] is tensor and depth:
            if not _reshape_accepts(node, axis, shape, depth - 1, memo):
                return False
        elif node.op == "MatMul" and not _weighted(node):
            if axis >= rank - 2:  # two activations, or a constant operand of attention (learned queries, folded)
                return False
        elif node.op == "InstanceNormalization" and axis != 1:
            return False
        elif depth and (node.inputs[0] is tensor or node.op in _BROADCASTS):  # these read it as any operand
            moved = _moved_axis(node, axis, rank, shape)
            if moved is _LOCKS or (moved is not None and not all(_accepts(y, *moved, shape, depth - 1, memo)
                                                                  for y in node.outputs)):
                return False
    return True


_LOCKS = "locks"
# Ops whose output keeps an operand's axes, right-aligned under broadcasting (Concat: along any axis).
_BROADCASTS = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Neg", "Abs", "Sqrt", "Exp", "Relu",
                         "Sigmoid", "Tanh", "Erf", "Gelu", "Softplus", "Cast", "Identity", "Expand", "Concat"))


def _moved_axis(node: gs.Node, axis: int, rank: int, shape) -> tuple[int, int] | str | None:
    """(axis, rank) of the outputs of a layout op that keeps channels on `axis` of its first input; _LOCKS where
    the op picks along `axis` or squeezes it out (unbind of a fused [3, B, H, T, D] qkv: the 3 is no carrier); None
    for other ops."""
    if node.op == "Transpose":
        return list(node.attrs.get("perm") or range(rank)[::-1]).index(axis), rank
    if node.op in _BROADCASTS:  # RoPE's rotate-half, grouped-query attention's Expand of k and v
        out = shape(node.outputs[0])
        return None if out is None else (axis + len(out) - rank, len(out))
    if node.op in ("Split", "Slice"):  # along `axis` too: the pieces keep channels there
        return axis, rank
    if node.op == "Gather" and shape(node.inputs[1]) is not None:
        picked, index_rank = int(node.attrs.get("axis", 0)) % rank, len(shape(node.inputs[1]))
        if picked == axis:
            return _LOCKS
        return (axis if axis < picked else axis + index_rank - 1), rank + index_rank - 1
    if node.op in ("Squeeze", "Unsqueeze"):
        return _squeezed_axis(node, axis, rank, shape)
    return None


def _squeezed_axis(node: gs.Node, axis: int, rank: int, shape) -> tuple[int, int] | None:
    axes, out = _ints(node, "axes", 1), shape(node.outputs[0])
    if axes is None or out is None:
        return None
    if node.op == "Squeeze":
        removed = [a % rank for a in axes] or [i for i, d in enumerate(shape(node.inputs[0]) or []) if d == 1]
        return _LOCKS if axis in removed else (axis - sum(1 for a in removed if a < axis), len(out))
    inserted = sorted(a % len(out) for a in axes)
    return [i for i in range(len(out)) if i not in inserted][axis], len(out)


def _weighted(matmul: gs.Node) -> bool:
    """X·W with a constant 2-D W: channels of X live on its last axis."""
    w = _constant(matmul.inputs[1])
    return w is not None and np.ndim(w.values) == 2


def _reshape_accepts(node: gs.Node, axis: int, shape, depth: int, memo: dict) -> bool:
    y = node.outputs[0]
    run = _reshape_run(shape(node.inputs[0]), shape(y), axis)
    if run is None:
        return True  # the reshape's own handler decides
    _, _, y_dims, y_offset = run
    rank = len(shape(y))
    return any(_accepts(y, y_offset + j, rank, shape, depth, memo) for j, d in enumerate(y_dims) if d > 1)


@handles("DepthToSpace", "SpaceToDepth")
class PixelShuffle(Handler):
    """Channels moved into space and back (torch's pixel_shuffle / pixel_unshuffle, TensorFlow's depth_to_space).
    With block b, channel c of the side with C channels is made of b*b channels of the other: c*b*b + k
    (DepthToSpace in CRD mode, torch's) or k*C + c (DCR mode, and SpaceToDepth). Removing c removes all of them;
    the op keeps its attributes."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        if space.axis != 1 or space.rank != 4:
            b.lock(x, f"{node.op} {node.name!r} reads channels on axis {space.axis}")
            return
        if b.new_space(y, 1) is None:
            return
        few, deep = (y, x) if node.op == "DepthToSpace" else (x, y)
        block = int(node.attrs["blocksize"]) ** 2
        mode = node.attrs.get("mode", "DCR")
        if node.op == "DepthToSpace" and (mode.decode() if isinstance(mode, bytes) else mode) == "CRD":
            b.tie_block(few, deep, block)
            return
        size, base = b.space(few).size, b.space(deep).base
        for k in range(block):
            b.uf.union_runs(b.space(few).base, base + k * size, size)


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


@handles("Gather")
class Gather(Handler):
    """Picking along another axis keeps the channels: a ViT's class token (x[:, 0] on [N, T, C]) or a sequence's
    last step (y[:, :, -1] on [N, C, T]). The indices' rank replaces the picked axis (a scalar removes it).
    Picking channels, or indices that carry channels themselves, is locked. Rows of a constant table are an
    embedding lookup, whose columns are channels (_lookup)."""

    def propagate(self, node, b):
        x, indices = node.inputs[0], node.inputs[1]
        space = b.space(x)
        if space is None:
            self._lookup(node, b)
            return
        axis = int(node.attrs.get("axis", 0)) % space.rank
        index_shape = b.shape(indices)
        if axis == space.axis:
            b.lock(x, f"Gather {node.name!r} picks along the channel axis")
            return
        if index_shape is None or b.space(indices) is not None:
            b.lock(x, f"Gather {node.name!r} has indices of unknown rank")
            return
        _follow(node, b, space.axis if space.axis < axis else space.axis + len(index_shape) - 1)

    @staticmethod
    def _lookup(node, b):
        """An embedding table E [V, C] read by this node alone, rows picked by token ids: the output's last axis
        holds C channels, each a column of E (its filter), so a transformer's residual stream starts here."""
        table, y = _constant(node.inputs[0]), node.outputs[0]
        if table is None or np.ndim(table.values) != 2 or int(node.attrs.get("axis", 0)) % 2 != 0 \
                or not _only_use(table) or b.space(node.inputs[1]) is not None:
            return
        if b.new_space(y, -1) is not None:
            b.add_filters(node, y, np.asarray(table.values).T)

    def apply(self, node, view):
        keep = view.keep(node.outputs[0])
        if keep is not None and view.space(node.inputs[0]) is None:  # an embedding lookup: its table's columns
            _take(view.own(node, 0), keep, 1)


@handles("Expand")
class Expand(Handler):
    """Broadcasting other axes keeps channels: grouped-query attention expands k and v [B, KV, 1, T, D] to
    [B, KV, G, T, D] and merges them into the query heads (Reshape [B, KV·G, T, D]), so removing kv head c
    removes query heads c·G .. c·G+G-1. The target's channel entry is 1 or the channel count; apply makes it the
    kept count. Broadcasting the channel axis itself is locked."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space, out = b.space(x), b.shape(y)
        if space is None and _filled(node) is not None:
            _tie_fill(node, b)  # a value broadcast to Shape(src): src's channels
            return
        if space is None:
            self._copies(node, b)
            return
        axis = space.axis + len(out) - space.rank if out is not None else -1
        if axis < 0 or out[axis] != space.size:
            b.lock(x, f"Expand {node.name!r} broadcasts the channel axis or has an unknown output shape")
            return
        _follow(node, b, axis)

    @staticmethod
    def _copies(node, b):
        """An activation without channels broadcast along one inner axis and merged into another by a Reshape:
        its copies there are channels of their own, tied to nothing before (multi-query attention repeats its
        one k/v head for every query head, and a query head then goes alone). Not where the copies meet others
        elementwise: an attention mask expanded to [B, 1, T, T] would tie its rows to the heads."""
        x, y = node.inputs[0], node.outputs[0]
        shape_x, out = b.shape(x), b.shape(y)
        if _constant(x) is not None or shape_x is None or out is None \
                or not all(r.op == "Reshape" and r.inputs[0] is y for r in y.outputs):
            return
        offset = len(out) - len(shape_x)
        axes = [i for i, d in enumerate(shape_x) if d == 1 and isinstance(out[i + offset], int)
                and out[i + offset] > 1 and i + offset > 0]
        if len(axes) == 1:
            b.new_space(y, axes[0] + offset)

    def apply(self, node, view):
        space, keep = view.space(node.outputs[0]), view.keep(node.outputs[0])
        fill = _filled(node) is not None and _shape_source(node.inputs[1], None) is not None  # follows Shape(src)
        if keep is not None and not fill:  # the input's count, or the copies kept
            _set_target_entry(node, view, space.axis, space.rank, len(keep))


@handles("Resize", "Upsample")
class Resize(Handler):
    """Resizing other axes keeps channels. Resize's `sizes` (input 3) name the channel count: as a constant where
    torch.export writes F.interpolate with a static shape ([N, C, H, W], one constant every such resize shares),
    which apply rewrites to the kept count; or read off the input's own Shape at run time (torch's legacy exporter
    with a dynamic batch), which follows by itself. A scale other than 1 or a size other than the count on the
    channel axis resizes the channels themselves, and sizes computed any other way are not followed (locked)."""

    def propagate(self, node, b):
        x = node.inputs[0]
        space = b.space(x)
        if space is None:
            return
        entry, sizes = self._entry(node, space), self._operand(node, 3)
        if entry is not None:
            for values, fixed in ((self._scales(node), 1.0), (_constant(sizes), space.size)):
                if values is not None and np.asarray(getattr(values, "values", values)).ravel()[entry] != fixed:
                    b.lock(x, f"{node.op} {node.name!r} resizes the channel axis")
                    return
            if sizes is not None and _constant(sizes) is None and not self._own_count(sizes, entry, x, space, b):
                b.lock(x, f"Resize {node.name!r} has sizes computed at run time from other than its input's shape")
                return
        _follow(node, b, space.axis)

    def apply(self, node, view):
        space, keep = view.space(node.outputs[0]), view.keep(node.outputs[0])
        sizes = self._operand(node, 3)
        entry = self._entry(node, space) if space is not None else None
        if keep is not None and entry is not None and _constant(sizes) is not None:
            _set_target_entry(node, view, entry, np.asarray(sizes.values).size, len(keep), index=3)

    @classmethod
    def _scales(cls, node):
        """The scales when constant: Upsample-7's attribute; an input of Upsample-9 and opset 10's Resize (X, scales),
        and from opset 11 on the third input of Resize (X, roi, scales, sizes)."""
        if "scales" in node.attrs:
            return node.attrs["scales"]
        return _constant(cls._operand(node, 1 if node.op == "Upsample" or len(node.inputs) == 2 else 2))

    @staticmethod
    def _operand(node, index) -> gs.Tensor | None:
        return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None

    @staticmethod
    def _entry(node, space) -> int | None:
        """Where the channel axis sits in `scales` and `sizes` (opset 18's `axes` may leave it out)."""
        axes = [a % space.rank for a in node.attrs.get("axes", range(space.rank))]
        return axes.index(space.axis) if space.axis in axes else None

    @staticmethod
    def _own_count(sizes, entry, x, space, b) -> bool:
        """Is entry `entry` of sizes built at run time x's own channel count, read off Shape(x)?"""
        pieces = _shape_pieces(sizes, b)
        found = None if pieces is None else _piece_at(pieces, entry, b)
        return found is not None and _shape_read(pieces[found[0]][1], found[1], b) == (x, space.axis)


@handles("ConstantOfShape")
class ConstantOfShape(Handler):
    """A tensor filled to the whole shape of x (torch's zeros_like(x), full_like(x): Where(IsNaN(p), 0, p)) has x's
    channels: every channel holds the same value, so removing it with x's is exact, and Shape(x) shrinks with it."""

    def propagate(self, node, b):
        _tie_fill(node, b)


def _tie_fill(node: gs.Node, b) -> None:
    """Tie a filled tensor to src where the shape it is filled to (ConstantOfShape's only input, Expand's target)
    is the whole Shape(src)."""
    source = _shape_source(node.inputs[-1], b)
    space = b.space(source) if source is not None else None
    if space is not None and b.new_space(node.outputs[0], space.axis) is not None:
        b.tie(source, node.outputs[0])


@handles("Shape")
class Shape(Handler):
    """Shape reads dims, not values. When what reads it picks other dims than the channel axis (a batch size to
    build a recurrent layer's initial state, a sequence length), removing channels changes nothing it computes:
    its output carries no channels. The channel count may go on into reshape targets only (through a Slice or
    Gather and a Concat): the Reshape handler ties it to the channels it sizes, or locks them; anything else
    that reads it is locked."""

    def propagate(self, node, b):
        x, y = node.inputs[0], node.outputs[0]
        space = b.space(x)
        if space is None:
            return
        start = int(node.attrs.get("start", 0)) % max(space.rank, 1)
        end = int(node.attrs.get("end", space.rank))
        end = end % space.rank if end < 0 else min(end, space.rank)
        if start <= space.axis < end and not all(_picks_other(c, space.axis - start, end - start)
                                                  or _into_reshape_targets(c, x) or _restores(c, y, b)
                                                  or _into_own_resize(c, x) or _fills(c, y, b) for c in y.outputs):
            b.lock(x, f"Shape {node.name!r} passes the channel count on")
            return
        b.statistic(y)


def _into_reshape_targets(consumer: gs.Node, x: gs.Tensor) -> bool:
    """Does the shape vector of x go, through a Slice or Gather and a Concat, only into targets of reshapes
    (x.flatten(2) with a dynamic batch; torch.export's kᵀ back to Shape(k)[:2] = [B, H])? The Reshape handler then
    checks that the entry is the channel count of what it reshapes, ties the two, or locks the vector's source. Also
    into the target of an Expand of x itself (or of x unsqueezed: repeat_kv), whose handler writes the kept count."""
    return _into_shape_operands(consumer, lambda r, vector: r.inputs[1] is vector and (
        r.op == "Reshape" or (r.op == "Expand" and _unsqueezed(r.inputs[0]) is x)))


def _unsqueezed(t: gs.Tensor) -> gs.Tensor:
    """The tensor `t` is made from by Unsqueeze alone (`t` itself if none)."""
    while t.inputs and t.inputs[0].op == "Unsqueeze":
        t = t.inputs[0].inputs[0]
    return t


def _into_own_resize(consumer: gs.Node, x: gs.Tensor) -> bool:
    """Does the shape vector of x go, through a Slice or Gather and a Concat, only into the sizes of resizes of x
    itself (F.interpolate(x, size=...) with a dynamic batch)? The Resize handler checks that the channel entry is
    x's own count, or locks x."""
    return _into_shape_operands(consumer, lambda r, vector: r.op == "Resize" and len(r.inputs) > 3
                                and r.inputs[3] is vector and r.inputs[0] is x)


def _into_shape_operands(consumer: gs.Node, reads) -> bool:
    """Does `consumer` (a Slice or Gather of a shape vector, or a Concat of it) go through Concats only into nodes
    `reads(node, vector)` accepts?"""
    if consumer.op not in ("Slice", "Gather", "Concat"):
        return False
    concats = [consumer] if consumer.op == "Concat" else _past_rank_moves(consumer.outputs)
    return bool(concats) and all(
        c.op == "Concat" and c.outputs[0].outputs and all(reads(r, c.outputs[0]) for r in c.outputs[0].outputs)
        for c in concats)


def _fills(consumer: gs.Node, shape: gs.Tensor, b) -> bool:
    """Is `consumer` a ConstantOfShape of this whole shape vector, or an Expand of a constant to it (torch's
    zeros_like, by either exporter)? Their handlers tie the filled tensor to the vector's source."""
    return _shape_source(shape, b) is not None and (consumer.op == "ConstantOfShape" or (
        consumer.op == "Expand" and consumer.inputs[1] is shape and _filled(consumer) is not None))


def _filled(expand: gs.Node) -> gs.Constant | None:
    """The constant an Expand broadcasts when it holds one value (a scalar fill), else None."""
    value = _constant(expand.inputs[0])
    return value if value is not None and np.asarray(value.values).size == 1 else None


def _past_rank_moves(tensors: list[gs.Tensor]) -> list[gs.Node]:
    """The readers of `tensors`, looking through Squeeze and Unsqueeze (torch's legacy exporter turns a picked dim
    into a scalar and back: Unsqueeze(Squeeze(Slice(Shape(x), -1)))) and a Mul by an integer constant (repeat_kv's
    n_kv * n_rep); the handler of the node it reaches checks what the entry is."""
    readers = []
    for t in tensors:
        for node in t.outputs:
            scaled = node.op == "Mul" and any(_constant(i) is not None and np.asarray(i.values).dtype.kind == "i"
                                              for i in node.inputs)
            moves = node.op in ("Squeeze", "Unsqueeze") or scaled
            readers += _past_rank_moves(node.outputs) if moves else [node]
    return readers


def _restores(consumer: gs.Node, shape: gs.Tensor, b) -> bool:
    """Is `consumer` a Reshape to this whole shape vector (`_shape_source`)? The Reshape handler then ties its output
    to the vector's source, or locks its input, so both keep the same channel count."""
    return consumer.op == "Reshape" and consumer.inputs[1] is shape and _shape_source(shape, b) is not None


def _picks_other(consumer: gs.Node, axis: int, length: int) -> bool:
    """Does `consumer` of a shape vector read only entries other than `axis` (a Gather or a Slice of others)?"""
    if consumer.op == "Gather" and int(consumer.attrs.get("axis", 0)) == 0 and _constant(consumer.inputs[1]):
        return axis not in (np.asarray(consumer.inputs[1].values).reshape(-1) % length).tolist()
    bounds = _vector_slice(consumer, length) if consumer.op == "Slice" else None
    return bounds is not None and not bounds[0] <= axis < bounds[1]
