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
from irtool.ir.model import Model, subgraphs_of
from irtool.ir.skeleton import infer_types, skeleton, tensor_size_problems


def verify(model: Model, proto: onnx.ModelProto | None = None) -> None:
    """Raise VerificationError listing the first problems found; return None when the IR is sound."""
    problems = structural_problems(model)
    if problems:
        raise VerificationError(_summarize(problems))
    proto = proto if proto is not None else model.to_proto()
    problems = tensor_size_problems(proto)
    if problems:
        raise VerificationError(_summarize(problems))
    try:
        onnx.checker.check_model(skeleton(proto))
        infer_types(proto, strict=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"onnx rejects the model: {str(e).strip().splitlines()[0]}") from e


def _summarize(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def structural_problems(model: Model) -> list[str]:
    problems: list[str] = []
    node_names: set[str] = set()
    stack: list[tuple[gs.Graph, frozenset[str]]] = [(model.graph, frozenset())]
    while stack:
        graph, visible = stack.pop()
        problems.extend(_graph_problems(graph, visible, node_names))
        defined = set(visible) | _defined_names(graph)
        for node in graph.nodes:
            for sub in subgraphs_of(node):
                stack.append((sub, frozenset(defined)))
    return problems


def _defined_names(graph: gs.Graph) -> set[str]:
    names = {t.name for t in graph.inputs}
    for node in graph.nodes:
        names.update(t.name for t in node.outputs if t.name)
    names.update(name for name, t in graph.tensors().items() if isinstance(t, gs.Constant))
    return names


def _graph_problems(graph: gs.Graph, visible: frozenset[str], node_names: set[str]) -> list[str]:
    problems: list[str] = []
    available = set(visible) | {t.name for t in graph.inputs}
    constants = {t.name for t in _constants(graph)}
    available |= constants
    producers: dict[str, str] = {}
    produced_later = {t.name for node in graph.nodes for t in node.outputs if t.name}
    for node in graph.nodes:
        if not node.name:
            problems.append(f"a {node.op} node has no name")
        elif node.name in node_names:
            problems.append(f"node name {node.name!r} is used twice")
        node_names.add(node.name)
        for tensor in node.inputs:
            if not tensor.name or tensor.name in available:
                continue
            if tensor.name in produced_later:
                problems.append(f"node {node.name!r} uses {tensor.name!r} before it is produced (not in topological order)")
            else:
                problems.append(f"node {node.name!r} uses {tensor.name!r}, which nothing defines")
        for tensor in node.outputs:
            if not tensor.name:
                continue
            if tensor.name in producers or tensor.name in constants or tensor.name in {t.name for t in graph.inputs}:
                first = producers.get(tensor.name, "a graph input or initializer")
                problems.append(f"value {tensor.name!r} has two producers: {first!r} and {node.name!r}")
            producers[tensor.name] = node.name
            if len(tensor.inputs) > 1:
                problems.append(f"value {tensor.name!r} is produced by {len(tensor.inputs)} nodes")
            available.add(tensor.name)
    for tensor in graph.outputs:
        if tensor.name not in available:
            problems.append(f"graph output {tensor.name!r} is not defined")
    return problems


def _constants(graph: gs.Graph) -> list[gs.Constant]:
    return [t for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant)] + \
           [t for t in graph.outputs if isinstance(t, gs.Constant)]
