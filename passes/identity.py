"""Eliminate identity-like nodes: y = f(x) where f is provably the identity on x.

Recognized (one handler per op type, each returns whether the node is a no-op):
    Identity                      always
    Dropout                       inference: training_mode absent or constant false, mask unused
    Cast                          `to` equals the input's element type
    Reshape                       constant shape, input and output have the same static shape
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
    replace_uses,
    static_shape,
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
        types = value_types(model, ctx.input_shapes or None)
        removed = rewritten = 0
        for graph in list(model.graphs()):
            with GraphEdit(graph) as edit:
                for node in list(graph.nodes):
                    if not self._is_noop(graph, node, types):
                        continue
                    outcome = bypass(edit, node)
                    removed += outcome == "removed"
                    rewritten += outcome == "identity"
        stats = {"nodes_removed": removed, "nodes_made_identity": rewritten}
        return PassResult(modified=bool(removed or rewritten), preserved=(), stats=stats)

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
    before = static_shape(types, node.inputs[0].name)
    after = static_shape(types, node.outputs[0].name)
    return len(node.inputs) > 1 and before is not None and before == after


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
