"""The IR verifier, run after every pass in tests and with --verify-each.

Structural checks run on the graphsurgeon graph, descending into subgraphs: every node has a unique
name, every value has at most one producer, nodes are in topological order, every use refers to a
graph input, an initializer, an earlier node's output or a value visible from an enclosing graph,
and every graph output is defined. Then onnx.checker and strict shape inference run on the
weight-free skeleton (irtool.ir.skeleton), with a byte-count check of the large tensors it leaves out.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from irtool.errors import VerificationError
from irtool.ir.convert import paused_gc
from irtool.ir.model import Model, subgraphs_of
from irtool.ir.skeleton import check_model, tensor_size_problems


def verify(model: Model, proto: onnx.ModelProto | None = None) -> None:
    """Raise VerificationError listing the first problems found; return None when the IR is sound."""
    with paused_gc():
        _verify(model, proto)


def _verify(model: Model, proto: onnx.ModelProto | None) -> None:
    problems = structural_problems(model)
    if problems:
        raise VerificationError(_summarize(problems))
    proto = proto if proto is not None else model.to_proto()
    problems = tensor_size_problems(proto)
    if problems:
        raise VerificationError(_summarize(problems))
    try:
        check_model(proto)  # serialized once for the checker and shape inference
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"onnx rejects the model: {str(e).strip().splitlines()[0]}") from e


def _summarize(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def structural_problems(model: Model) -> list[str]:
    """One linear pass per graph. A subgraph sees the names its enclosing graphs define through a
    chain of per-graph sets (no copy of the outer names per subgraph)."""
    problems: list[str] = []
    node_names: set[str] = set()
    stack: list[tuple[gs.Graph, tuple[set[str], ...]]] = [(model.graph, ())]
    while stack:
        graph, visible = stack.pop()
        defined = _check_graph(graph, visible, node_names, problems)
        inner = (*visible, defined)
        for node in graph.nodes:
            if node.attrs:
                for sub in subgraphs_of(node):
                    stack.append((sub, inner))
    return problems


def _check_graph(graph: gs.Graph, visible: tuple[set[str], ...], node_names: set[str],
                 problems: list[str]) -> set[str]:
    """Append graph's problems; return the names it defines (inputs, constants, node outputs)."""
    input_names = {t.name for t in graph.inputs}
    constants = {t.name for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant)}
    constants.update(t.name for t in graph.outputs if isinstance(t, gs.Constant))
    available = input_names | constants

    def is_available(name: str) -> bool:
        return name in available or any(name in scope for scope in visible)

    producers: dict[str, str] = {}
    produced_later = {t.name for node in graph.nodes for t in node.outputs if t.name}
    for node in graph.nodes:
        if not node.name:
            problems.append(f"a {node.op} node has no name")
        elif node.name in node_names:
            problems.append(f"node name {node.name!r} is used twice")
        node_names.add(node.name)
        for tensor in node.inputs:
            name = tensor.name
            if not name or name in available or (visible and is_available(name)):
                continue
            if name in produced_later:
                problems.append(f"node {node.name!r} uses {name!r} before it is produced (not in topological order)")
            else:
                problems.append(f"node {node.name!r} uses {name!r}, which nothing defines")
        for tensor in node.outputs:
            name = tensor.name
            if not name:
                continue
            if name in producers or name in constants or name in input_names:
                first = producers.get(name, "a graph input or initializer")
                problems.append(f"value {name!r} has two producers: {first!r} and {node.name!r}")
            producers[name] = node.name
            if len(tensor.inputs) > 1:
                problems.append(f"value {name!r} is produced by {len(tensor.inputs)} nodes")
            available.add(name)
    for tensor in graph.outputs:
        if not is_available(tensor.name):
            problems.append(f"graph output {tensor.name!r} is not defined")
    if "" in available and "" not in input_names:
        available.discard("")  # an unnamed constant defines nothing
    return available
