"""Erf GELU matching and fusion, shared by the `fuse-gelu` pass and insert-qdq{profile=ort-cpu}.

    y = 0.5 · x · (1 + erf(x / √2))

Exporters spell it as Div(x, √2) or Mul(x, 1/√2), then Erf, Add 1, and two Muls in one of three orders:
    PyTorch   Mul(Mul(x, a), 0.5)      or  Mul(Mul(x, 0.5), a)      (a = 1 + erf(...))
    Keras     Mul(Mul(a, 0.5), x)
These are the patterns ONNX Runtime's own fusion matches (onnxruntime/quantization/fusions/fusion_gelu.py,
which tests/passes/test_fuse_gelu.py uses as an oracle); it is not called here because it edits a
ModelProto's main graph, while passes edit the graphsurgeon IR in place and reach If/Loop bodies too.
Constants (initializers or Constant nodes) must be √2, 1/√2, 1 and 0.5 within 1e-5 relative, the
float32 spellings of any exporter; intermediate values must have no other reader.

Emitted op: the standard Gelu (approximate="none") when the model's opset is >= 20, else
com.microsoft.Gelu, which only ONNX Runtime runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import GraphEdit, is_default_domain, is_graph_output, is_used, value_types

STANDARD_GELU_OPSET = 20
TOLERANCE = 1e-5


@dataclass
class Match:
    x: gs.Tensor
    y: gs.Tensor
    nodes: list[gs.Node]


def fuse_gelu(model: Model) -> int:
    """Fuse every erf GELU of `model` (subgraphs included); returns how many were fused."""
    standard = model.opset >= STANDARD_GELU_OPSET
    matches = []
    for graph in list(model.graphs()):
        edit = GraphEdit(graph)
        found = [match for erf in graph.nodes if erf.op == "Erf" and is_default_domain(erf)
                 if (match := _match(edit, erf)) is not None]
        matches.append((edit, found))
    # ONNX shape inference stops at com.microsoft.Gelu: store its output type (= its input's) so that
    # the values after it keep theirs.
    types = value_types(model) if not standard and any(found for _, found in matches) else {}
    for edit, found in matches:
        positions = {id(node): index for index, node in enumerate(edit.graph.nodes)} if found else {}
        with edit:
            for match in found:
                # Where y's producer was: x is computed before it and y read after it.
                position = positions[id(match.y.inputs[0])]
                edit.graph.nodes[position] = _replace(model, edit, match, standard, types.get(match.x.name))
    return sum(len(found) for _, found in matches)


def _replace(model: Model, edit: GraphEdit, match: Match, standard: bool, x_type=None) -> gs.Node:
    """Detach the chain (and Constant nodes only it read); returns the Gelu node to put in its place."""
    erf_name = match.nodes[1].name
    name = model.unique_name(f"{erf_name.rsplit('/', 1)[0] if '/' in erf_name else erf_name}/Gelu")
    inputs = [tensor for node in match.nodes for tensor in node.inputs]
    for node in match.nodes:
        edit.remove(node)
    for tensor in inputs:  # Constant nodes that fed only the removed ones
        producer = edit.produced_here(tensor)
        if producer is not None and producer.op == "Constant" and not is_used(edit.graph, tensor):
            edit.remove(producer)
    gelu = gs.Node("Gelu", name=name, inputs=[match.x], outputs=[match.y],
                   domain=None if standard else "com.microsoft")
    if standard:
        gelu.attrs["approximate"] = "none"
    elif x_type is not None and x_type[0]:
        match.y.dtype = onnx.helper.tensor_dtype_to_np_dtype(x_type[0])
        match.y.shape = x_type[1]
    return gelu


def _match(edit: GraphEdit, erf: gs.Node) -> Match | None:
    scaled = erf.inputs[0]
    scale_node = edit.produced_here(scaled)
    if scale_node is None or _only_reader(edit, scaled) is not erf:
        return None
    x = _scaled_input(scale_node)
    add = _only_reader(edit, erf.outputs[0], "Add")
    if x is None or add is None or _other_input(add, erf.outputs[0], 1.0) is None:
        return None
    first = _only_reader(edit, add.outputs[0], "Mul")
    tail = None if first is None else _tail(edit, x, add.outputs[0], first)
    if tail is None:
        return None
    extra, y = tail
    return Match(x, y, [scale_node, erf, add, first, extra])


def _tail(edit: GraphEdit, x: gs.Tensor, a: gs.Tensor, first: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """The other Mul of the GELU and its output, given `first` = the Mul that reads a = 1 + erf(...)."""
    other = _other_input(first, a)
    if other is None:
        return None
    if other is x or _is_scalar(other, 0.5):  # Mul(x, a) then ·0.5, or Mul(a, 0.5) then ·x (Keras)
        second = _only_reader(edit, first.outputs[0], "Mul")
        last = None if second is None else _other_input(second, first.outputs[0])
        ok = last is not None and (_is_scalar(last, 0.5) if other is x else last is x)
        return (second, second.outputs[0]) if ok else None
    half = edit.produced_here(other)  # Mul(Mul(x, 0.5), a)
    if half is None or half.op != "Mul" or not is_default_domain(half) or _only_reader(edit, other) is not first:
        return None
    return (half, first.outputs[0]) if _other_input(half, x, 0.5) is not None else None


def _scaled_input(node: gs.Node) -> gs.Tensor | None:
    """x of Div(x, √2) or Mul(x, 1/√2)."""
    if not is_default_domain(node) or len(node.inputs) != 2:
        return None
    if node.op == "Div" and _is_scalar(node.inputs[1], math.sqrt(2)):
        return node.inputs[0]
    if node.op == "Mul":
        for index in (0, 1):
            if _is_scalar(node.inputs[1 - index], math.sqrt(0.5)):
                return node.inputs[index]
    return None


def _other_input(node: gs.Node, known: gs.Tensor, value: float | None = None) -> gs.Tensor | None:
    """The input of a binary node that is not `known` (and is the scalar `value`, if given), or None."""
    if len(node.inputs) != 2 or not any(t is known for t in node.inputs):
        return None
    other = node.inputs[1] if node.inputs[0] is known else node.inputs[0]
    return other if value is None or _is_scalar(other, value) else None


def _only_reader(edit: GraphEdit, tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The single node of this graph reading `tensor` (of type `op` if given), when nothing else reads it."""
    if len(tensor.outputs) != 1 or is_graph_output(edit.graph, tensor):
        return None
    node = tensor.outputs[0]
    if id(node) not in edit.members or (op is not None and (node.op != op or not is_default_domain(node))):
        return None
    return node


def _is_scalar(tensor: gs.Tensor, value: float) -> bool:
    """Whether `tensor` is a one-element float constant (initializer or Constant node) equal to `value`."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        tensor = tensor.inputs[0].attrs.get("value")
    if not isinstance(tensor, gs.Constant):
        return False
    values = np.asarray(tensor.values)
    return values.size == 1 and values.dtype.kind == "f" and \
        abs(float(values.reshape(-1)[0]) - value) <= TOLERANCE * abs(value)
