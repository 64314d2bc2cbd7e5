"""Two-operand Einsum as MatMul (with Transpose, Reshape, Unsqueeze/Squeeze around it), for `einsum-to-matmul`.

Why: ONNX Runtime and TensorRT run Einsum in float only, so an attention written with torch.einsum or a Keras
EinsumDense layer (tf2onnx keeps them as Einsum) stays float in every INT8 model, and irtool's cost analysis
counts no MACs for it. As MatMul it gets integer kernels (QLinearMatMul, TensorRT's INT8 GEMM) like any other.

Every subscript letter of `A,B->out` falls in one group:
  batch   in A, B and out        leading dims of both MatMul operands (broadcast as numpy does)
  K       in A and B, not out    the contraction: the last dim of A', the second-last of B'
  free A  in A and out only      its last letter is the M dim of A'; the others lead A' (1s in B')
  free B  in B and out only      its last letter is the N dim of B'; the others lead B' (1s in A')
Where an operand is a constant, its free letters merge into one M (N) dim and its K letters into one, by
reshaping the constant itself (EinsumDense "abc,cde->abde": one [c, d*e] weight, not d small MatMuls), and the
MatMul output is reshaped back. Several K letters of an activation merge with a Reshape when their sizes are
known. The result [batch, free A lead, free B lead, M, N] is transposed to the output's order; a free group
with no letter gets a dim of 1, squeezed afterwards.

Declined (left as Einsum): more or fewer than two operands, a letter repeated within an operand (a diagonal) or
summed out of one operand alone, no contraction letter (an outer product), an operand of unknown rank, an
ellipsis whose rank is unknown, and K letters of activations whose sizes are unknown when several must merge.
Contract: bounded. MatMul may sum the products in another order than a runtime's Einsum; measured against
ONNX Runtime 1.32's Einsum on N(0, 1) operands with 64-long contractions (attention scores, EinsumDense, two
merged contracted letters) the outputs were bit-identical, and tests/passes/test_einsum.py checks 18
equations against numpy's float64 einsum within 1e-5.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import GraphEdit, ValueTypes, is_default_domain, value_types


@dataclass
class Equation:
    """A two-operand equation with the ellipsis spelled out as letters."""

    a: str
    b: str
    out: str


def parse(equation: str, rank_a: int, rank_b: int) -> Equation | None:
    """The equation with explicit output and no ellipsis, or None when it is not a well-formed two-operand
    equation for operands of these ranks."""
    text = equation.replace(" ", "")
    left, arrow, out = text.partition("->")
    operands = left.split(",")
    if len(operands) != 2:
        return None
    used = set(text) - set(".,->")
    spare = [c for c in string.ascii_letters if c not in used]
    ellipsis_rank = max(rank_a - len(operands[0].replace("...", "")), rank_b - len(operands[1].replace("...", "")),
                        0)
    if len(spare) < ellipsis_rank:
        return None
    dots = "".join(spare[:ellipsis_rank])  # right-aligned, as numpy broadcasts

    def expand(term: str, rank: int) -> str | None:
        if "..." not in term:
            return term if len(term) == rank else None
        count = rank - len(term.replace("...", ""))
        if count < 0 or term.count("...") != 1:
            return None
        return term.replace("...", dots[len(dots) - count:] if count else "")

    a, b = expand(operands[0], rank_a), expand(operands[1], rank_b)
    if a is None or b is None or not all(c in string.ascii_letters for c in a + b):
        return None
    if not arrow:  # implicit output: the letters seen once, sorted; an ellipsis leads
        once = sorted(c for c in set(a + b) if (a + b).count(c) == 1 and c not in dots)
        out = "".join(c for c in dots if c in a + b) + "".join(once)
    elif "..." in out:
        out = out.replace("...", "".join(c for c in dots if c in a + b))
    if not all(c in a + b for c in out) or len(set(out)) != len(out):
        return None
    return Equation(a, b, out)


@dataclass
class Plan:
    """How the two operands are laid out for MatMul (see the module docstring)."""

    batch: str
    lead_a: str     # free A letters that lead (A' has them, B' has 1s)
    lead_b: str
    m: str          # the letters merged into A's M dim ("" = a dim of 1)
    n: str
    k: str


def layout_of(eq: Equation, constant_a: bool, constant_b: bool) -> Plan | None:
    if len(set(eq.a)) != len(eq.a) or len(set(eq.b)) != len(eq.b):
        return None  # a diagonal
    if any(c not in eq.out and c not in (eq.b if c in eq.a else eq.a) for c in eq.a + eq.b):
        return None  # summed out of one operand alone
    batch = "".join(c for c in eq.out if c in eq.a and c in eq.b)
    k = "".join(c for c in eq.a if c in eq.b and c not in eq.out)
    if not k:
        return None  # an outer product
    free_a = "".join(c for c in eq.a if c in eq.out and c not in eq.b)
    free_b = "".join(c for c in eq.b if c in eq.out and c not in eq.a)
    lead_a, m = ("", free_a) if constant_a else (free_a[:-1], free_a[-1:])
    lead_b, n = ("", free_b) if constant_b else (free_b[:-1], free_b[-1:])
    return Plan(batch, lead_a, lead_b, m, n, k)


def einsum_to_matmul(model: Model) -> int:
    """Rewrite every two-operand Einsum the module docstring admits; returns how many."""
    types: ValueTypes | None = None
    rewritten = 0
    for graph in list(model.graphs()):
        found = [node for node in graph.nodes if node.op == "Einsum" and is_default_domain(node)
                 and len(node.inputs) == 2 and len(node.outputs) == 1]
        if not found:
            continue
        if types is None:
            types = value_types(model)
        edit = GraphEdit(graph)
        with edit:
            for node in found:
                replacement = _rewrite(model, node, types)
                if replacement is None:
                    continue
                position = next(i for i, n in enumerate(graph.nodes) if n is node)
                edit.remove(node)
                graph.nodes[position:position] = replacement
                rewritten += 1
    return rewritten


def _shape(tensor: gs.Tensor, types: ValueTypes) -> list | None:
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    entry = types.get(tensor.name)
    return list(entry[1]) if entry is not None and entry[1] is not None else None


def _rewrite(model: Model, node: gs.Node, types: ValueTypes) -> list[gs.Node] | None:
    """The nodes replacing `node` (writing its output), or None when it is declined. Nothing is created or
    linked before every check has passed."""
    a, b = node.inputs
    constant_a, constant_b = isinstance(a, gs.Constant), isinstance(b, gs.Constant)
    shape_a, shape_b = _shape(a, types), _shape(b, types)
    if shape_a is None or shape_b is None or (constant_a and constant_b):  # both constant: fold-constants' job
        return None
    eq = parse(str(node.attrs.get("equation", "")), len(shape_a), len(shape_b))
    layout = layout_of(eq, constant_a, constant_b) if eq is not None else None
    if layout is None:
        return None
    sizes = {c: d for term, dims in ((eq.a, shape_a), (eq.b, shape_b)) for c, d in zip(term, dims, strict=True)
             if isinstance(d, int) and d > 0}
    if not constant_b and len(layout.k) > 1 and layout.n and not all(c in sizes for c in layout.k):
        return None  # B' [.., K1, K2, N] merges K only with its size known
    builder = _Builder(model, node.name or "Einsum")
    left = builder.operand(a, eq.a, layout.batch + layout.lead_a, "", len(layout.lead_b), layout.m, layout.k,
                           sizes)
    right = builder.operand(b, eq.b, layout.batch, layout.lead_b, len(layout.lead_a), layout.k, layout.n, sizes)
    product = builder.add("MatMul", [left, right], builder.tensor("MatMul"))
    return builder.finish(product, node.outputs[0], eq.out, layout, sizes)


def _product(letters: str, sizes: dict) -> int:
    return int(np.prod([sizes[c] for c in letters], dtype=np.int64))


class _Builder:
    """Nodes around the MatMul, named after the Einsum."""

    def __init__(self, model: Model, prefix: str):
        self.model, self.prefix = model, prefix
        self.nodes: list[gs.Node] = []

    def tensor(self, what: str) -> gs.Variable:
        return gs.Variable(self.model.unique_name(f"{self.prefix}/{what}_output"))

    def const(self, what: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.model.unique_name(f"{self.prefix}/{what}"), np.ascontiguousarray(values))

    def add(self, op: str, inputs: list, output: gs.Tensor, **attrs) -> gs.Tensor:
        name = self.model.unique_name(f"{self.prefix}/{op}")
        self.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[output]))
        return output

    def reshape(self, x: gs.Tensor, spec: list[int]) -> gs.Tensor:
        return self.add("Reshape", [x, self.const("shape", np.array(spec, np.int64))], self.tensor("Reshape"))

    def axes_op(self, op: str, x: gs.Tensor, axes: list[int]) -> gs.Tensor:
        """Unsqueeze or Squeeze (x itself when there is no axis)."""
        if not axes:
            return x  # axes are an input from opset 13, irtool's minimum
        return self.add(op, [x, self.const("axes", np.array(axes, np.int64))], self.tensor(op))

    def operand(self, x: gs.Tensor, term: str, lead: str, lead_after: str, ones: int, first: str, second: str,
                sizes: dict) -> gs.Tensor:
        """x as [lead, 1 x ones, lead_after, first, second] (A': batch + lead_a, -, -, M, K; B': batch, lead_b
        after the 1s, K, N), `first` and `second` each one dim (1 where empty)."""
        order = lead + lead_after + first + second
        perm = [term.index(c) for c in order]
        if not lead:
            ones = 0  # leading 1s: MatMul broadcasts a lower rank as it would them (and a 2-D weight stays 2-D)
        if isinstance(x, gs.Constant):
            values = np.transpose(x.values, perm)
            head = [*values.shape[:len(lead)], *[1] * ones, *values.shape[len(lead):len(lead + lead_after)]]
            return self.const("weight", values.reshape(head + [_product(first, sizes), _product(second, sizes)]))
        if perm != sorted(perm):
            x = self.add("Transpose", [x], self.tensor("Transpose"), perm=perm)
        rank = len(order)
        if len(first) > 1 or len(second) > 1:  # K of an activation (its free groups lead instead of merging)
            if len(second) > 1:  # [.., M, K1..Kk] -> [.., M, -1]: 0 copies a dim
                spec = [0] * (rank - len(second)) + [-1]
            elif second:  # [.., K1..Kk, N] -> [.., prod K, -1] (checked: K's sizes are known)
                spec = [0] * (rank - len(first) - 1) + [_product(first, sizes), -1]
            else:  # [.., K1..Kk] -> [.., -1]
                spec = [0] * (rank - len(first)) + [-1]
            x = self.reshape(x, spec)
            rank = len(spec)
        if not first:
            x = self.axes_op("Unsqueeze", x, [rank - 1])
            rank += 1
        if not second:
            x = self.axes_op("Unsqueeze", x, [rank])
        return self.axes_op("Unsqueeze", x, list(range(len(lead), len(lead) + ones)))

    def finish(self, product: gs.Tensor, y: gs.Tensor, out: str, layout: Plan, sizes: dict) -> list[gs.Node]:
        """The MatMul's [batch, lead_a, lead_b, M, N] with merged M/N split back, empty ones squeezed and the
        dims transposed to `out`; the last node writes `y`."""
        head = len(layout.batch + layout.lead_a + layout.lead_b)
        if len(layout.m) > 1 or len(layout.n) > 1:  # merged constants' free letters: their sizes are known
            spec = [0] * head + ([sizes[c] for c in layout.m] if len(layout.m) > 1 else [0])
            spec += [sizes[c] for c in layout.n] if len(layout.n) > 1 else [-1 if len(layout.m) > 1 else 0]
            product = self.reshape(product, spec)
        dims = layout.batch + layout.lead_a + layout.lead_b + (layout.m or "1") + (layout.n or "1")
        product = self.axes_op("Squeeze", product, [i for i, c in enumerate(dims) if c == "1"])
        dims = dims.replace("1", "")
        perm = [dims.index(c) for c in out]
        if perm != sorted(perm):
            product = self.add("Transpose", [product], self.tensor("Transpose"), perm=perm)
        last = self.nodes[-1]
        last.outputs.clear()
        last.outputs.append(y)
        return self.nodes
