"""Eliminate identity-like nodes: y = f(x) where f is provably the identity on x.

Recognized (one handler per op type, each returns whether the node is a no-op):
    Identity                      always
    Dropout                       inference: training_mode absent or constant false, mask unused
    Cast                          `to` equals the input's element type
    Reshape                       constant shape, input and output have the same shape (numbers, or the
                                  same named symbols); when that holds only under --input-shape, the inputs
                                  then declare those shapes
    Transpose                     perm == [0, 1, ..., r-1] (no perm: reversal, identity for r <= 1)
    Pad                           constant pads, all zero (every mode is then a no-op)
    Concat                        a single input

Rewrite: readers of y read x instead and the node goes. Graph output names never change: when y is
an output of its graph, x's producer (in the same graph) is made to emit y directly and x's other
readers read y; when x has no producer there (a graph input, an initializer, an outer-scope value,
or itself a graph output) the node stays as a plain Identity.

Every handler also requires all non-data inputs to be constants, so removing a node never leaves a
computation without readers (cleanup stays idempotent without another dce).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import (
    GraphEdit,
    ValueTypes,
    is_default_domain,
    is_graph_output,
    is_used,
    pin_input_shapes,
    replace_uses,
    value_types,
)
from irtool.passmanager import Pass, PassContext, PassResult

NoopCheck = Callable[[gs.Node, ValueTypes], bool]


class EliminateIdentity(Pass):
    """Remove Identity, inference Dropout and no-op Cast/Reshape/Transpose/Pad/Concat nodes."""

    name = "eliminate-identity"

    @dataclass(frozen=True)
    class Options:
        remove_pads: bool = True  # also remove Pad nodes whose pads are all zero

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        given = ctx.input_shapes or None
        types = value_types(model, given)
        own = value_types(model) if given else types  # a no-op only under --input-shape specializes the model
        removed = rewritten = 0
        specialized = False
        for graph in list(model.graphs()):
            with GraphEdit(graph) as edit:
                for node in list(graph.nodes):
                    if not self._is_noop(graph, node, types):
                        continue
                    specialized |= own is not types and not self._is_noop(graph, node, own)
                    outcome = bypass(edit, node)
                    removed += outcome == "removed"
                    rewritten += outcome == "identity"
        pinned = pin_input_shapes(model, given, self.name) if specialized else []
        stats = {"nodes_removed": removed, "nodes_made_identity": rewritten,
                 **({"inputs_pinned": pinned} if pinned else {})}
        return PassResult(modified=bool(removed or rewritten or pinned), preserved=(), stats=stats)

    def _is_noop(self, graph: gs.Graph, node: gs.Node, types: ValueTypes) -> bool:
        check = NOOP_CHECKS.get(node.op)
        if check is None or not is_default_domain(node) or not node.inputs or not node.outputs:
            return False
        if node.op == "Pad" and not self.options.remove_pads:
            return False
        # Extra outputs (Dropout's mask) must be unused, or removing the node would orphan a reader.
        if any(t.name and is_used(graph, t) for t in node.outputs[1:]):
            return False
        return _params_constant(node) and check(node, types)


def _params_constant(node: gs.Node) -> bool:
    return all(isinstance(t, gs.Constant) or not t.name for t in node.inputs[1:])


def bypass(edit: GraphEdit, node: gs.Node) -> str:
    """Route readers of node's output to its first input; returns 'removed', 'identity' or 'kept'."""
    graph = edit.graph
    source, out = node.inputs[0], node.outputs[0]
    if not is_graph_output(graph, out):
        replace_uses(out, source)
        edit.remove(node)
        return "removed"
    producer = edit.produced_here(source)
    if producer is not None and not is_graph_output(graph, source):
        # The producer takes over the output name; source's other readers follow it.
        slot = next(i for i, t in enumerate(producer.outputs) if t is source)
        edit.remove(node)
        replace_uses(source, out)
        producer.outputs[slot] = out
        return "removed"
    if node.op == "Identity":
        return "kept"
    _make_identity(node, source)
    return "identity"


def _make_identity(node: gs.Node, source: gs.Tensor) -> None:
    out = node.outputs[0]
    node.op = "Identity"
    node.attrs.clear()
    node.inputs.clear()
    node.inputs.append(source)
    node.outputs.clear()
    node.outputs.append(out)


# --------------------------------------------------------------------------- per-op checks
def _elem_type(tensor: gs.Tensor, types: ValueTypes) -> int | None:
    if tensor.name in types and types[tensor.name][0]:
        return types[tensor.name][0]
    if tensor.dtype is None:
        return None
    if isinstance(tensor.dtype, int):
        return tensor.dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))


def _identity(node: gs.Node, types: ValueTypes) -> bool:
    return True


def _dropout(node: gs.Node, types: ValueTypes) -> bool:
    # The mask output is checked by the caller (extra outputs must be unused).
    if len(node.inputs) > 2 and node.inputs[2].name:
        return not bool(np.asarray(node.inputs[2].values).any())
    return True


def _cast(node: gs.Node, types: ValueTypes) -> bool:
    source = _elem_type(node.inputs[0], types)
    return source is not None and source == node.attrs.get("to")


def _reshape(node: gs.Node, types: ValueTypes) -> bool:
    before = _known_dims(types, node.inputs[0].name)
    after = _known_dims(types, node.outputs[0].name)
    return len(node.inputs) > 1 and before is not None and before == after


def _known_dims(types: ValueTypes, name: str) -> list[int | str] | None:
    """Dims that are numbers or named symbols ("?", an unknown dim, makes the shape unknown): a Reshape whose
    output keeps the input's symbols (x[N, 4] by [0, -1]) is a no-op for every N."""
    dims = types.get(name, (0, None))[1]
    return None if dims is None or "?" in dims else list(dims)


def _transpose(node: gs.Node, types: ValueTypes) -> bool:
    perm = node.attrs.get("perm")
    if perm is not None:
        return list(perm) == list(range(len(perm)))
    dims = types.get(node.inputs[0].name, (0, None))[1]
    return dims is not None and len(dims) <= 1


def _pad(node: gs.Node, types: ValueTypes) -> bool:
    return len(node.inputs) > 1 and node.inputs[1].name != "" and not np.asarray(node.inputs[1].values).any()


def _concat(node: gs.Node, types: ValueTypes) -> bool:
    return len(node.inputs) == 1


NOOP_CHECKS: dict[str, NoopCheck] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Concat": _concat,
}
