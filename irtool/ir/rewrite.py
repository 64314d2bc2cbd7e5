"""Small graph-editing helpers shared by passes (passes never import each other, see DESIGN.md).

graphsurgeon keeps producer/consumer lists on every tensor, and a subgraph node that reads an
outer-scope value holds the very same Tensor object as the outer graph. So rewiring through
`tensor.outputs` reaches readers in If/Loop bodies too, and a removed node must be detached (inputs
and outputs cleared) so that no tensor keeps pointing at it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.skeleton import _set_input_shapes, _value_type, skeleton

log = logging.getLogger(__name__)

ValueTypes = dict[str, tuple[int, list[int | str] | None]]
# Standard ops that carry subgraphs; reading every node's attributes through protobuf costs more.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
# Ops that read a tensor's dims and none of its values.
SHAPE_READERS = frozenset({"Shape", "Size"})


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every node reading `old` (subgraph nodes included) read `new`; graph outputs are untouched."""
    count = 0
    for node in list(old.outputs):
        for index, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[index] = new
                count += 1
    return count


def values_digest(values: np.ndarray) -> str:
    """A short digest of an array's bytes (C order): how a pass recognizes, later, a weight an earlier one noted."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]


def is_default_domain(node: gs.Node) -> bool:
    """Whether node is a standard ONNX op (graphsurgeon leaves the domain None when the proto had none)."""
    return node.domain in (None, "", "ai.onnx")


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def is_used(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether a node reads `tensor` or it is an output of `graph`."""
    return bool(tensor.outputs) or is_graph_output(graph, tensor)


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Detach and drop `nodes` from `graph` (by identity: graphsurgeon's Node.__eq__ compares fields)."""
    doomed = {id(node): node for node in nodes}
    for node in doomed.values():
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [node for node in graph.nodes if id(node) not in doomed]
    return len(doomed)


class GraphEdit:
    """Batched edits of one graph: producer lookups in O(1) and node removals applied in one rebuild of
    the node list (`flush`). Removing nodes one call at a time rebuilds the list each time, which is
    quadratic on large graphs. Removed nodes are detached at once, so the graph reads consistently
    before `flush`; only `graph.nodes` still lists them until then."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.members = {id(node) for node in graph.nodes}
        self.doomed: set[int] = set()

    def produced_here(self, tensor: gs.Tensor) -> gs.Node | None:
        if not tensor.inputs:
            return None
        producer = tensor.inputs[0]
        return producer if id(producer) in self.members else None

    def remove(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.members.discard(id(node))
        self.doomed.add(id(node))

    def flush(self) -> int:
        removed = len(self.doomed)
        if removed:
            self.graph.nodes = [node for node in self.graph.nodes if id(node) not in self.doomed]
            self.doomed.clear()
        return removed

    def __enter__(self) -> GraphEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def produced_here(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The node of `graph` itself (not of an enclosing graph) that produces `tensor`, if any."""
    if not tensor.inputs:
        return None
    producer = tensor.inputs[0]
    return producer if any(node is producer for node in graph.nodes) else None


def value_types(model: Model, input_shapes: dict[str, list[int]] | None = None) -> ValueTypes:
    """{value name: (elem_type, dims or None)} for every graph, subgraph bodies included.

    irtool.ir.skeleton.infer_types reads only the main graph's value_info; passes that look inside
    If/Loop bodies need the inferred types stored in the nested GraphProtos as well.
    """
    proto = model.shape_inference_proto()
    skel = skeleton(proto)
    if input_shapes:
        _set_input_shapes(skel, input_shapes)
    inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    types: ValueTypes = {}
    conflicting: set[str] = set()
    stack = [inferred.graph]
    while stack:
        graph = stack.pop()
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            found = _value_type(info)
            if types.setdefault(info.name, found) != found:
                conflicting.add(info.name)
        for node in graph.node:
            if node.op_type in CONTROL_FLOW or node.domain not in ("", "ai.onnx"):
                stack.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)
                for attr in node.attribute:
                    stack.extend(attr.graphs)
    initializers: ValueTypes = {}
    for tensor in _all_initializers(proto.graph):
        found = (tensor.data_type, list(tensor.dims))
        if initializers.setdefault(tensor.name, found) != found:
            conflicting.add(tensor.name)
    types.update(initializers)
    # Sibling bodies (then/else) may reuse a name with another type: such a name has no one answer.
    for name in conflicting:
        types.pop(name, None)
    return types


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found: list[onnx.TensorProto] = []
    stack = [graph]
    while stack:
        current = stack.pop()
        found.extend(current.initializer)
        for node in current.node:
            if node.op_type in CONTROL_FLOW or node.domain not in ("", "ai.onnx"):
                stack.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)
    return found


def static_shape(types: ValueTypes, name: str) -> list[int] | None:
    entry = types.get(name)
    if entry is None or entry[1] is None or any(not isinstance(d, int) for d in entry[1]):
        return None
    return list(entry[1])


def pin_input_shapes(model: Model, shapes: dict[str, list[int]], by: str) -> list[str]:
    """Declare `shapes` (the context's --input-shape) as the model's input shapes, after pass `by` rewrote the
    model in a way that holds for them only (a Shape folded to constants, a Reshape dropped as a no-op). With its
    inputs still symbolic, a BERT export folded for 8 x 24 and run at 16 x 24 failed inside ONNX Runtime
    ("Attempting to broadcast an axis by a dimension other than 1") instead of naming the input. Returns the
    pinned input names. A dim name one of them fixes (the sequence of token ids) is fixed in the inputs that share it
    (their attention mask) too: the model was rewritten for that size everywhere."""
    from irtool.ir.skeleton import symbol_sizes

    log.warning("%s rewrote the model for --input-shape %s: its inputs now declare those shapes (give no "
                "--input-shape to keep them dynamic)", by,
                ", ".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in sorted(shapes.items())))
    sizes = symbol_sizes([(t.name, t.shape) for t in model.graph.inputs], shapes)
    pinned = []
    for tensor in model.graph.inputs:
        if tensor.name in shapes:
            tensor.shape = list(shapes[tensor.name])
        elif tensor.shape and any(isinstance(d, str) and d in sizes for d in tensor.shape):
            tensor.shape = [sizes.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
        else:
            continue
        pinned.append(tensor.name)
    return sorted(pinned)
