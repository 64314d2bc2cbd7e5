"""GELU matching and fusion (erf and tanh forms), shared by the `fuse-gelu` pass and insert-qdq{profile=ort-cpu}.

    y = 0.5 · x · (1 + erf(x / √2))

Exporters spell it as Div(x, √2) or Mul(x, 1/√2), then Erf, Add 1, and two Muls in one of three orders:
    PyTorch   Mul(Mul(x, a), 0.5)      or  Mul(Mul(x, 0.5), a)      (a = 1 + erf(...))
    Keras     Mul(Mul(a, 0.5), x)
These are the patterns ONNX Runtime's own fusion matches (onnxruntime/quantization/fusions/fusion_gelu.py,
which tests/passes/test_fuse_gelu.py uses as an oracle); it is not called here because it edits a
ModelProto's main graph, while passes edit the graphsurgeon IR in place and reach If/Loop bodies too.
Constants (initializers or Constant nodes) must be √2, 1/√2, 1 and 0.5 within 1e-5 relative, the
float32 spellings of any exporter; intermediate values must have no other reader.

The tanh approximation (torch's gelu(approximate="tanh"), Hugging Face's gelu_new)

    y = 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))

has more spellings (x³ as Pow or two Muls, constants folded in different places), so it is matched by shape
and then checked by value: Tanh -> Add 1 -> the same Mul tails as above give x; everything between x and the
Tanh must be Add/Sub/Mul/Div/Pow of x and scalar constants (at most 8 nodes), and that region, evaluated in
float64 on 401 points of [-10, 10], must equal the formula within 1e-5 relative (+1e-7 absolute).

Emitted op: the standard Gelu (approximate "none" or "tanh") when the model's opset is >= 20, else
com.microsoft.Gelu or com.microsoft.FastGelu, which only ONNX Runtime runs.
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


ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
MAX_TANH_REGION = 8
PROBE = np.linspace(-10.0, 10.0, 401)


@dataclass
class Match:
    x: gs.Tensor
    y: gs.Tensor
    nodes: list[gs.Node]
    tanh: bool = False


def fuse_gelu(model: Model) -> int:
    """Fuse every erf GELU of `model` (subgraphs included); returns how many were fused."""
    standard = model.opset >= STANDARD_GELU_OPSET
    matches = []
    for graph in list(model.graphs()):
        edit = GraphEdit(graph)
        found = [match for node in graph.nodes if node.op in ("Erf", "Tanh") and is_default_domain(node)
                 if (match := (_match(edit, node) if node.op == "Erf" else _match_tanh(edit, node))) is not None]
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
    core = next(node.name for node in match.nodes if node.op in ("Erf", "Tanh"))
    name = model.unique_name(f"{core.rsplit('/', 1)[0] if '/' in core else core}/Gelu")
    inputs = [tensor for node in match.nodes for tensor in node.inputs]
    for node in match.nodes:
        edit.remove(node)
    for tensor in inputs:  # Constant nodes that fed only the removed ones
        producer = edit.produced_here(tensor)
        if producer is not None and producer.op == "Constant" and not is_used(edit.graph, tensor):
            edit.remove(producer)
    op = "Gelu" if standard or not match.tanh else "FastGelu"
    gelu = gs.Node(op, name=name, inputs=[match.x], outputs=[match.y], domain=None if standard else "com.microsoft")
    if standard:
        gelu.attrs["approximate"] = "tanh" if match.tanh else "none"
    elif x_type is not None and x_type[0]:
        match.y.dtype = onnx.helper.tensor_dtype_to_np_dtype(x_type[0])
        match.y.shape = x_type[1]
    return gelu


def _match(edit: GraphEdit, erf: gs.Node) -> Match | None:
    scaled = erf.inputs[0]
    scale_node = edit.produced_here(scaled)
    if scale_node is None or _only_reader(edit, scaled) is not erf:
        return None
    x, tail = _scaled_input(scale_node), _tail(edit, erf)
    if x is None or tail is None or tail[0] is not x:
        return None
    return Match(x, tail[2], [scale_node, erf, *tail[1]])


def _match_tanh(edit: GraphEdit, tanh: gs.Node) -> Match | None:
    tail = _tail(edit, tanh)
    cone = None if tail is None else _cone(edit, tanh.inputs[0], tail[0])
    if cone is None:
        return None
    x, rest, y = tail
    nodes = [*cone, tanh, *rest]
    if not _closed(edit, nodes, y) or not _is_tanh_gelu(edit, x, nodes, y):
        return None
    return Match(x, y, nodes, tanh=True)


def _tail(edit: GraphEdit, core: gs.Node) -> tuple[gs.Tensor, list[gs.Node], gs.Tensor] | None:
    """After the Erf or Tanh: a = Add(core, 1), then Mul(Mul(x, a), 0.5), Mul(Mul(x, 0.5), a) or
    Mul(Mul(a, 0.5), x). Returns (x, the Add and the two Muls, y) or None."""
    add = _only_reader(edit, core.outputs[0], "Add")
    if add is None or _other_input(add, core.outputs[0], 1.0) is None:
        return None
    a = add.outputs[0]
    first = _only_reader(edit, a, "Mul")
    other = None if first is None else _other_input(first, a)
    if other is None:
        return None
    half = edit.produced_here(other)
    if half is not None and half.op == "Mul" and is_default_domain(half) and _only_reader(edit, other) is first:
        for index in (0, 1):
            if len(half.inputs) == 2 and _is_scalar(half.inputs[1 - index], 0.5):
                return half.inputs[index], [add, half, first], first.outputs[0]
    second = _only_reader(edit, first.outputs[0], "Mul")
    last = None if second is None else _other_input(second, first.outputs[0])
    if last is None:
        return None
    if _is_scalar(other, 0.5):  # Keras: 0.5 first, x last
        return last, [add, first, second], second.outputs[0]
    return (other, [add, first, second], second.outputs[0]) if _is_scalar(last, 0.5) else None


def _cone(edit: GraphEdit, start: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """The arithmetic nodes computing `start` from x and scalar constants alone, in graph order; None otherwise."""
    found: dict[int, gs.Node] = {}
    stack = [start]
    while stack:
        tensor = stack.pop()
        if tensor is x or _scalar(tensor) is not None:
            continue
        node = edit.produced_here(tensor)
        if node is None or node.op not in ARITHMETIC or not is_default_domain(node) or len(node.outputs) != 1:
            return None
        if id(node) not in found:
            found[id(node)] = node
            if len(found) > MAX_TANH_REGION:
                return None
            stack.extend(node.inputs)
    order = {id(node): index for index, node in enumerate(edit.graph.nodes) if id(node) in found}
    return sorted(found.values(), key=lambda node: order[id(node)])


def _closed(edit: GraphEdit, nodes: list[gs.Node], y: gs.Tensor) -> bool:
    """Whether only `nodes` read the values they compute, except y."""
    inside = {id(node) for node in nodes}
    return all(out is y or (not is_graph_output(edit.graph, out) and all(id(r) in inside for r in out.outputs))
               for node in nodes for out in node.outputs)


def _is_tanh_gelu(edit: GraphEdit, x: gs.Tensor, nodes: list[gs.Node], y: gs.Tensor) -> bool:
    """Evaluate the region on PROBE in float64 and compare with the tanh formula."""
    order = {id(node): index for index, node in enumerate(edit.graph.nodes)}
    values = {id(x): PROBE}
    for node in sorted(nodes, key=lambda node: order[id(node)]):
        args = [values.get(id(t), _scalar(t)) for t in node.inputs]
        if any(a is None for a in args):
            return False
        with np.errstate(all="ignore"):
            values[id(node.outputs[0])] = _EVAL[node.op](*args)
    want = 0.5 * PROBE * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (PROBE + 0.044715 * PROBE ** 3)))
    got = values.get(id(y))
    return got is not None and bool(np.allclose(got, want, rtol=TOLERANCE, atol=1e-7))


_EVAL = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power, "Tanh": np.tanh}


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
    found = _scalar(tensor)
    return found is not None and abs(found - value) <= TOLERANCE * abs(value)


def _scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element float constant (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        tensor = tensor.inputs[0].attrs.get("value")
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return float(values.reshape(-1)[0]) if values.size == 1 and values.dtype.kind in "fiu" else None
