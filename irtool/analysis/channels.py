"""Analysis `channel-groups`: which channels are coupled and must be removed together.

Every tensor that carries prunable channels gets a channel axis and one *element* per channel.
Per-op handlers (irtool.analysis.channel_handlers, one per op type) propagate axes forward in
topological order and tie elements together:

  * a producer (Conv, Gemm, MatMul with a constant weight) starts a fresh channel space on its
    output; each output element owns one *filter* (a weight row) whose norm is its importance;
  * pass-through ops (activations, BatchNormalization, pooling, ...) tie output channel i to input
    channel i; elementwise ops with broadcasting tie all full-channel operands together (residual
    adds couple two producers); depthwise Conv ties its input channel i to its output channel i;
  * Concat ties output channel offset+i to channel i of its k-th input; Flatten ties feature
    c*HW+j of its output to channel c of its input (Conv -> Flatten -> Gemm).

A union-find over all elements gives *atoms*: sets of (tensor, index) that are one channel seen from
everywhere it flows; removing an atom removes every index in it. Atoms touching a graph output, a
tensor an op without a handler reads, or a shape that cannot be proven are *locked*, with the reason
kept for the report. Atoms a statistic is taken over (a LayerNorm over the channel axis, a mean over
channels) are *soft* locked: exact pruning keeps them, prune{through-norms=true} removes them. Atoms
over the same set of tensors form a *group* (one layer's channels); pruning ranks atoms inside a group.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.shapes import ShapeInfo, Shapes
from irtool.ir.convert import paused_gc
from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types, symbol_sizes
from irtool.ir.topo import outer_uses, topo_order
from irtool.passmanager import Analysis, PassContext

log = logging.getLogger(__name__)


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, count: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return start

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller root wins so that atom ids do not depend on union order.
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_runs(self, a: int, b: int, count: int) -> None:
        """union(a + i, b + i) for i < count, with find inlined: ResNet-50 at 224x224 ties 57k pairs."""
        parent = self.parent
        for i in range(count):
            ra, rb = a + i, b + i
            while parent[ra] != ra:
                parent[ra] = parent[parent[ra]]
                ra = parent[ra]
            while parent[rb] != rb:
                parent[rb] = parent[parent[rb]]
                rb = parent[rb]
            if ra < rb:
                parent[rb] = ra
            elif rb < ra:
                parent[ra] = rb

    def roots(self) -> np.ndarray:
        """The root of every element, by pointer jumping over the whole array at once (ResNet-50 at 224x224
        has 145k channel elements: one find() each took a fifth of a second)."""
        roots = np.asarray(self.parent, dtype=np.int64)
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                return roots
            roots = jumped


@dataclass
class Space:
    """The channel axis of one tensor and where its elements start in the union-find."""

    axis: int
    size: int
    base: int
    rank: int


@dataclass
class Filter:
    """A prunable unit: output channel `index` of producer `node`, with weight rows for importance."""

    node: str
    tensor: str
    index: int
    weights: np.ndarray


@dataclass
class Group:
    """Interchangeable atoms over the same tensors (one layer's channels)."""

    key: tuple[str, ...]
    atoms: list[int]
    filters: dict[int, list[Filter]]
    locked: str | None = None
    # locked only because a statistic is taken over these channels (a LayerNorm or RMSNorm over them, a reduction
    # over the channel axis): prune{through-norms=true} removes them anyway, and the statistic covers the kept ones
    soft: bool = False

    @property
    def size(self) -> int:
        return len(self.atoms)


@dataclass
class ChannelGraph:
    """Result of the analysis: spaces per tensor, atoms, groups and lock reasons."""

    spaces: dict[str, Space]
    uf: UnionFind
    filters: list[Filter]
    locks: dict[int, str] = field(default_factory=dict)
    soft_locks: dict[int, str] = field(default_factory=dict)  # atoms locked only by a norm over their channels
    groups: list[Group] = field(default_factory=list)
    # The weights behind `filters` and `slices`, (node, tensor, rows): rows[i] (any rank) for channel i.
    filter_blocks: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    slice_blocks: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    roots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # every element's atom
    notes: dict[str, Any] = field(default_factory=dict)  # what a handler's propagate left its apply, by node name
    # Weights that several nodes read with their channels tied (Builder.share): sliced once (PruneView.once)
    tied_weights: frozenset[str] = frozenset()

    def atom(self, tensor: str, index: int) -> int:
        return int(self.roots[self.spaces[tensor].base + index])

    @property
    def slices(self) -> list[Filter]:
        """Consumer input-channel weights, one per channel a consumer reads: built on demand (ResNet-50 reads 26k
        channels, and pruning by weight norm needs only slice_blocks)."""
        return [Filter(node, tensor, i, rows[i]) for node, tensor, rows in self.slice_blocks
                for i in range(rows.shape[0])]

    def atoms_of(self, tensor: str) -> np.ndarray:
        """The atom of each channel of `tensor`."""
        space = self.spaces[tensor]
        return self.roots[space.base:space.base + space.size]

    def removed_mask(self, removed_atoms: Collection[int]) -> np.ndarray:
        """A boolean per element id (atom ids are element ids): True for the removed atoms."""
        mask = np.zeros(len(self.roots), dtype=bool)
        mask[np.fromiter(removed_atoms, np.int64, len(removed_atoms))] = True
        return mask

    def keep_indices(self, tensor: str, removed: np.ndarray) -> np.ndarray | None:
        """Indices of `tensor`'s channel axis that survive (`removed`: removed_mask), or None when nothing is
        removed."""
        if tensor not in self.spaces:
            return None
        keep = np.flatnonzero(~removed[self.atoms_of(tensor)])
        return None if len(keep) == self.spaces[tensor].size else keep.astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "groups": [
                {"tensors": list(g.key), "channels": g.size, "locked": g.locked, "soft": g.soft,
                 "producers": sorted({f.node for fs in g.filters.values() for f in fs})}
                for g in self.groups
            ],
            "prunable_groups": sum(1 for g in self.groups if g.locked is None),
            "locked_groups": sum(1 for g in self.groups if g.locked is not None),
        }


class PruneView:
    """What handlers see while applying a removal: surviving indices and channel spaces per tensor, and the
    constants a node may slice (`own`)."""

    def __init__(self, graph: ChannelGraph, removed_atoms: set[int], outputs: Collection[str] = (),
                 unique_name: Callable[[str], str] | None = None):
        self.graph, self.removed = graph, removed_atoms
        self._removed_mask = graph.removed_mask(removed_atoms)
        self._outputs, self._unique_name = set(outputs), unique_name or (lambda prefix: prefix)
        self._cache: dict[str, np.ndarray | None] = {}
        self._sliced: set[str] = set()
        self.new_nodes: list[gs.Node] = []  # added by handlers; the pass puts them in the graph

    def unique(self, prefix: str) -> str:
        """A name no tensor or node of the model has."""
        return self._unique_name(prefix)

    def gathered(self, tensor: gs.Tensor, indices: np.ndarray, axis: int) -> gs.Variable:
        """A new value: `tensor` with only `indices` along `axis`, by a Gather node (for inputs computed at run
        time, such as a recurrent layer's initial state)."""
        name = self._unique_name(f"{tensor.name}_kept")
        out = gs.Variable(name, dtype=tensor.dtype)
        index = gs.Constant(self._unique_name(f"{name}_indices"), np.asarray(indices, dtype=np.int64))
        self.new_nodes.append(gs.Node("Gather", name, attrs={"axis": axis}, inputs=[tensor, index], outputs=[out]))
        return out

    def own(self, node: gs.Node, index: int) -> gs.Constant:
        """The constant node.inputs[index], first copied for this node alone when another node reads it or it is
        a graph output: dedup-initializers merges equal biases (two convs' zero biases), and slicing the shared
        one for the first conv broke the second."""
        constant = node.inputs[index]
        if len(constant.outputs) > 1 or constant.name in self._outputs:
            copy = gs.Constant(self._unique_name(constant.name), np.array(constant.values))
            node.inputs[index] = copy
            return copy
        return constant

    def once(self, node: gs.Node, index: int) -> gs.Constant | None:
        """The weight node.inputs[index] to slice, as `own` gives it; for a tied weight (ChannelGraph.tied_weights:
        every reader keeps the same channels) the first reader gets it and the others None, so that the readers
        keep sharing one sliced weight instead of a copy each."""
        constant = node.inputs[index]
        if constant.name not in self.graph.tied_weights or constant.name in self._outputs:
            return self.own(node, index)
        if constant.name in self._sliced:
            return None
        self._sliced.add(constant.name)
        return constant

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None:
        if tensor.name not in self._cache:
            self._cache[tensor.name] = self.graph.keep_indices(tensor.name, self._removed_mask)
        return self._cache[tensor.name]

    def space(self, tensor: gs.Tensor) -> Space | None:
        return self.graph.spaces.get(tensor.name)


class Builder:
    """What handlers see while the analysis walks the graph."""

    def __init__(self, shapes: ShapeInfo):
        self.shapes = shapes
        self.spaces: dict[str, Space] = {}
        self.uf = UnionFind()
        self.filters: list[Filter] = []
        self.filter_blocks: list[tuple[str, str, np.ndarray]] = []
        self.slice_blocks: list[tuple[str, str, np.ndarray]] = []
        self.tensor_locks: dict[str, str] = {}
        self.soft_tensor_locks: dict[str, str] = {}
        self.statistics: set[str] = set()  # outputs that hold a statistic over channels, and so carry none
        self.notes: dict[str, Any] = {}
        self.shared: dict[str, list[tuple[gs.Tensor, ...]]] = {}  # constant name -> its readers' sides (share)
        self.shared_readers: dict[str, int] = {}  # constant name -> how many nodes read it

    def shape(self, tensor: gs.Tensor) -> list[int | str] | None:
        """Dims of a tensor; symbolic dims (a dynamic batch) stay strings, channel dims must be ints."""
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
        return self.shapes.shape(tensor.name)

    def space(self, tensor: gs.Tensor) -> Space | None:
        return self.spaces.get(tensor.name)

    def new_space(self, tensor: gs.Tensor, axis: int) -> Space | None:
        shape = self.shape(tensor)
        if shape is None or not shape or not isinstance(shape[axis % len(shape)], int):
            self.lock(tensor, "its channel count is not static")
            return None
        axis = axis % len(shape)
        space = Space(axis, shape[axis], self.uf.add(shape[axis]), len(shape))
        self.spaces[tensor.name] = space
        return space

    def tie(self, a: gs.Tensor, b: gs.Tensor, offset_b: int = 0) -> None:
        """Tie channel i of a to channel offset_b + i of b."""
        sa, sb = self.spaces[a.name], self.spaces[b.name]
        self.uf.union_runs(sa.base, sb.base + offset_b, sa.size)

    def tie_block(self, src: gs.Tensor, dst: gs.Tensor, block: int) -> None:
        """Tie channel c of src to channels c*block .. c*block+block-1 of dst (flattening)."""
        ss, sd = self.spaces[src.name], self.spaces[dst.name]
        for c in range(ss.size):
            for j in range(block):
                self.uf.union(ss.base + c, sd.base + c * block + j)

    def add_filters(self, node: gs.Node, tensor: gs.Tensor, rows: np.ndarray) -> None:
        self.filter_blocks.append((node.name, tensor.name, rows))
        for i in range(rows.shape[0]):
            self.filters.append(Filter(node.name, tensor.name, i, rows[i]))

    def add_slices(self, node: gs.Node, tensor: gs.Tensor, rows: np.ndarray) -> None:
        """Consumer weights that read channel i of `tensor` (rows[i]): they go with the channel too."""
        self.slice_blocks.append((node.name, tensor.name, rows))

    def lock(self, tensor: gs.Tensor, reason: str) -> None:
        self.tensor_locks.setdefault(tensor.name, reason)

    def share(self, constant: gs.Constant, sides: tuple[gs.Tensor, ...]) -> None:
        """A reader of `constant`, which other nodes read too (a block applied several times: iterative refinement,
        an RNN unrolled by torch.export), slices it along the channels of `sides`: a weight's (input, output), an
        elementwise operand's (output,). After the walk, tie_shared ties each side across the readers."""
        self.shared.setdefault(constant.name, []).append(sides)
        self.shared_readers[constant.name] = len(constant.outputs)

    def tie_shared(self) -> set[str]:
        """Tie each side of a shared weight's readers; where one reader cannot follow (no channels there, another
        axis or size, another kind of reader), lock that side for all of them. Either way every reader keeps the
        same channels of the weight, which is then sliced once (ChannelGraph.tied_weights).

        An elementwise operand (a bias) is tied only when its readers already keep the same channels (the
        applications of one tied layer); otherwise each reader slices a copy of it (PruneView.own).
        dedup-initializers merges equal constants, and tying the layers that read one zero bias would halve
        the free channels of a freshly initialised transformer."""
        tied = set()
        for name, readers in self.shared.items():
            if all(len(r) == 1 for r in readers):
                if self._agree(name, [r[0] for r in readers]):
                    tied.add(name)
                continue
            tied.add(name)
            self._tie_readers(name, readers)
        return tied

    def _agree(self, name: str, tensors: list[gs.Tensor]) -> bool:
        """Every reader of the constant registered, and their channels are already tied one to one."""
        spaces = [self.space(t) for t in tensors]
        if len(tensors) != self.shared_readers[name] or not all(spaces) \
                or len({(s.axis, s.size) for s in spaces}) != 1:
            return False
        find = self.uf.find
        first = [find(spaces[0].base + i) for i in range(spaces[0].size)]
        return all([find(s.base + i) for i in range(s.size)] == first for s in spaces[1:])

    def _tie_readers(self, name: str, readers: list[tuple[gs.Tensor, ...]]) -> None:
        sides = {len(r) for r in readers}
        # every reader registered (a reader whose handler never got that far, or has none, keeps all channels)
        complete = len(sides) == 1 and len(readers) == self.shared_readers[name]
        for side in range(max(sides)):
            tensors = [r[side] for r in readers if side < len(r)]
            spaces = [self.space(t) for t in tensors]
            if complete and all(spaces) and len({(s.axis, s.size) for s in spaces}) == 1:
                for t in tensors[1:]:
                    self.tie(tensors[0], t)
                continue
            for t, space in zip(tensors, spaces, strict=True):
                if space is not None:
                    self.lock(t, f"{name!r} is shared by {self.shared_readers[name]} nodes and one of them cannot "
                                 "follow its channels")

    def soft_lock(self, tensor: gs.Tensor, reason: str) -> None:
        """A lock prune lifts when asked to (Group.soft): removing these channels changes a statistic over them."""
        self.soft_tensor_locks.setdefault(tensor.name, reason)

    def statistic(self, tensor: gs.Tensor) -> None:
        """`tensor` carries no channels by design (a mean over them, the batch size read off a shape): nothing was
        lost, so the node's inputs stay unlocked."""
        self.statistics.add(tensor.name)


class ChannelGroups(Analysis):
    """Coupled channel groups of every prunable tensor, with lock reasons."""

    name = "channel-groups"

    def compute(self, model: Model, ctx: PassContext) -> ChannelGraph:
        with paused_gc():  # tens of thousands of Filters: each GC pass would rescan the whole model
            return self._compute(model, ctx)

    def _compute(self, model: Model, ctx: PassContext) -> ChannelGraph:
        from irtool.analysis.channel_handlers import HANDLERS

        builder = Builder(_shapes(model, ctx))
        nodes = model.graph.nodes
        for node in (nodes[i] for i in topo_order(nodes)):
            handler = HANDLERS.get(node.op)
            if handler is None:
                # outer_uses: an If's or Loop's branches read tensors of this graph without naming them as inputs
                for t in outer_uses(node):
                    if t.name in builder.spaces:
                        builder.lock(t, f"read by {node.op} node {node.name!r}, which has no channel handler")
                continue
            handler.propagate(node, builder)
        tied = builder.tie_shared()
        for t in model.graph.outputs:
            if t.name in builder.spaces:
                builder.lock(t, f"{t.name!r} is a graph output")
        return _finish(builder, tied)


# The batch size the analysis infers shapes with when the model's batch is symbolic (see _shapes).
BATCH_STANDIN = 5
# Sizes for the other symbolic input dims (a sequence length, an image side), one per name in sorted order: primes
# no channel or head count is likely to equal, large enough that downsampling keeps them above 1.
OTHER_STANDINS = (97, 101, 103, 107, 109, 113, 127, 131)


def _shapes(model: Model, ctx: PassContext) -> ShapeInfo:
    """Shapes with the symbolic input dims set to stand-in sizes: the batch (dim 0 of an input, and that dim wherever
    it appears) to BATCH_STANDIN, other named dims to OTHER_STANDINS.

    A model that runs at any batch size holds no batch-dependent constant in its reshape targets (they read -1,
    0 or Shape), so what the analysis proves at one batch size and the constants it rewrites hold at all. With
    the batch symbolic, a reshape that folds it with channels had no static shape to follow: nn.MultiheadAttention
    folds the heads into the batch ([T, B, H·D] -> [T, B·H, D]), and every head was locked. Not 1: a batch of one
    would hide such a fold; not 2 or 3, common channel and head counts. The same holds for a sequence length:
    Hugging Face's GPT-2 exported with dynamic batch and sequence flattens [B, T, C] to [B·T, C] around each Linear
    and back to Shape-read [B, T] plus C, and with T symbolic every channel was locked.

    A named dim an --input-shape gives as 1 gets its stand-in too (prune analyses the model before anything is
    specialized to that shape): at 1, shape inference broadcasts an Expand's 1 to its input's unknown dim, and a
    GPT-2 given input_ids:1x12 had every channel locked. The dims found static without any input shape are then
    the reference of the baked-batch check."""
    given = dict(ctx.input_shapes or {})
    ones = _given_ones(model, given)
    if ones:
        given = {name: [ones.get(d, g) if isinstance(d, str) else g for d, g in zip(_declared(model, name), dims,
                                                                                    strict=False)]
                 for name, dims in given.items()}
    bound = symbol_sizes([(t.name, t.shape) for t in model.graph.inputs], given)  # named in a given shape
    free = [t for t in model.graph.inputs if t.name not in given and t.shape]
    batch = {t.shape[0] for t in free if isinstance(t.shape[0], str) and t.shape[0] not in bound}
    others = sorted({d for t in free for d in t.shape if isinstance(d, str) and d not in bound and d not in batch})
    sizes = {**{d: BATCH_STANDIN for d in batch}, **dict(zip(others, OTHER_STANDINS, strict=False))}
    if not sizes and not ones:
        return ctx.analysis(Shapes, model)
    pinned = {t.name: [sizes.get(d, d) if isinstance(d, str) else d for d in t.shape] for t in free
              if any(d in sizes for d in t.shape if isinstance(d, str))}
    symbolic = ShapeInfo(infer_types(model.shape_inference_proto(), {})) if ones else ctx.analysis(Shapes, model)
    try:
        info = ShapeInfo(infer_types(model.shape_inference_proto(), {**given, **pinned}))
    except Exception as e:  # onnx's inference refuses the stand-ins: keep the symbolic shapes
        log.debug("channel-groups: shapes at stand-in sizes %s failed (%s); symbolic shapes", sizes, e)
        return ctx.analysis(Shapes, model)
    if _baked_batch(symbolic, info):
        return ctx.analysis(Shapes, model)
    return info


def _declared(model: Model, name: str) -> list:
    return next((list(t.shape or []) for t in model.graph.inputs if t.name == name), [])


def _given_ones(model: Model, given: dict[str, list[int]]) -> dict[str, int]:
    """Stand-ins for the named dims a given input shape sets to 1: BATCH_STANDIN for a batch (an input's dim 0),
    OTHER_STANDINS' last entries for others (the first ones go to dims no shape names)."""
    names = {d: i for name, dims in given.items() for i, (d, g) in enumerate(zip(_declared(model, name), dims,
                                                                                 strict=False))
             if isinstance(d, str) and d not in ("", "?") and g == 1}
    others = iter(reversed(OTHER_STANDINS))
    return {d: BATCH_STANDIN if i == 0 else next(others, OTHER_STANDINS[0]) for d, i in sorted(names.items())}


def _baked_batch(symbolic: ShapeInfo, pinned: ShapeInfo) -> bool:
    """Does a dim the symbolic inference found static change at the stand-in batch? Then the model holds its
    export's batch somewhere (a reshape constant: it declares a batch it cannot take), and the stand-in would
    prove things that hold at no batch it runs at."""
    for name, (_, dims) in symbolic.types.items():
        if dims is not None and all(isinstance(d, int) for d in dims):
            other = pinned.shape(name)
            if other is not None and list(other) != list(dims):
                log.debug("channel-groups: %s is %s at any size but %s at the stand-in sizes", name, dims, other)
                return True
    return False


def _finish(builder: Builder, tied: set[str]) -> ChannelGraph:
    graph = ChannelGraph(builder.spaces, builder.uf, builder.filters, filter_blocks=builder.filter_blocks,
                         slice_blocks=builder.slice_blocks,
                         roots=builder.uf.roots(), notes=builder.notes, tied_weights=frozenset(tied))
    for name, reason in sorted(builder.tensor_locks.items()):
        if name in builder.spaces:
            for atom in graph.atoms_of(name).tolist():
                graph.locks.setdefault(atom, reason)
    for name, reason in sorted(builder.soft_tensor_locks.items()):
        if name in builder.spaces:
            for atom in graph.atoms_of(name).tolist():
                if atom not in graph.locks:
                    graph.soft_locks.setdefault(atom, reason)
    members: dict[int, set[str]] = defaultdict(set)
    for name in builder.spaces:
        for atom in np.unique(graph.atoms_of(name)).tolist():
            members[atom].add(name)
    filters: dict[int, list[Filter]] = defaultdict(list)
    for f in builder.filters:
        filters[graph.atom(f.tensor, f.index)].append(f)
    by_key: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for atom in sorted(members):
        by_key[tuple(sorted(members[atom]))].append(atom)
    for key, atoms in sorted(by_key.items(), key=lambda kv: kv[1][0]):
        group = Group(key, atoms, {a: filters[a] for a in atoms})
        if any(a in graph.locks for a in atoms):
            group.locked = next(graph.locks[a] for a in atoms if a in graph.locks)
        elif not any(group.filters[a] for a in atoms):
            group.locked = "no producer filters (e.g. model input channels)"
        elif any(a in graph.soft_locks for a in atoms):
            group.locked, group.soft = next(graph.soft_locks[a] for a in atoms if a in graph.soft_locks), True
        graph.groups.append(group)
    return graph
