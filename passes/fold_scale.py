"""Pass `fold-scale`: a Mul or Div by a scalar constant goes into the weights of the linear layer that makes
its input.

Attention scales its scores: softmax(q·kᵀ · 1/√d). Exporters write the scale as a Mul or Div after the scores
MatMul (timm, Hugging Face), or as two Muls by d^-1/4 on q and kᵀ before it (torch's scaled_dot_product_attention).
Scaling the q (or k) projection's weight and bias instead leaves one op less per block on the largest tensor of
the block ([batch, heads, tokens, tokens]): in float, in calibration (one tensor less to observe) and in the
quantized model, where the scale was a QLinearMul requantizing the scores (bench/quant_bench.py's ViT, 12
blocks: batch-1 INT8 latency 17.5 -> 16.5 ms on 1 thread, 15.0 -> 14.5 on 2; calibration ~0.05 s less).

Rules:
  - the scale is a Mul by a constant with one element (either operand) or a Div by one (second operand), finite
    and non-zero;
  - its input comes from a layer whose output, and every value on the way, has no other reader (but Shape or
    Size, which read no value) and is not a graph output; the way may pass data movement that keeps every
    value (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity), not Split/Slice/Gather (a fused qkv
    projection would scale k and v too);
  - the layer is a MatMul with a constant operand (and the constant bias Add after it, which is scaled too), a
    Gemm with a constant B and a constant or no C, or a Conv with constant weights and bias;
  - a scale after a MatMul of two activations (the scores) moves to whichever operand such a layer makes.
The scaled weights are new constants (a weight shared with another layer keeps its values there). The
scale's output, when it is a graph output, is left alone (its name would change).
Contract: bounded (w·c is rounded once where x·w·c was rounded twice; exact for powers of two such as 1/√64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import GraphEdit, replace_uses
from irtool.passmanager import Pass, PassContext, PassResult

# Data movement that keeps every value exactly once (placement.PERMUTATION_OPS).
THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
SHAPE_ONLY = frozenset({"Shape", "Size"})


def _scalar(tensor: gs.Tensor) -> float | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    if values.size != 1 or values.ndim > 1 or values.dtype.kind != "f":
        return None
    value = float(values.reshape(()))
    return value if np.isfinite(value) and value != 0.0 else None


def _factor(node: gs.Node) -> tuple[float, gs.Tensor] | None:
    """(the factor, the scaled input) of a Mul or Div by a scalar constant."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op == "Div":
        value = _scalar(b)
        return (1.0 / value, a) if value is not None and not isinstance(a, gs.Constant) else None
    if node.op == "Mul":
        for c, x in ((b, a), (a, b)):
            value = _scalar(c)
            if value is not None and not isinstance(x, gs.Constant):
                return value, x
    return None


class _Folder:
    def __init__(self, model: Model):
        self.model = model
        self.outputs = {t.name for t in model.graph.outputs}

    def _alone(self, tensor: gs.Tensor) -> bool:
        """Read by one node only, not counting Shape and Size (the scale changes no shape: torch's legacy exporter
        reads a projection's shape to split it into heads), and not a graph output."""
        readers = [c for c in tensor.outputs if c.op not in SHAPE_ONLY]
        return isinstance(tensor, gs.Variable) and len(readers) == 1 and tensor.name not in self.outputs

    def _source(self, tensor: gs.Tensor) -> gs.Node | None:
        """The layer that makes `tensor` through value-keeping data movement, all on values nobody else reads."""
        while self._alone(tensor) and tensor.inputs:
            producer = tensor.inputs[0]
            if producer.op not in THROUGH:
                return producer
            tensor = producer.inputs[0]
        return None

    def scalable(self, layer: gs.Node | None) -> list[tuple[gs.Node, int]] | None:
        """The (node, input index) constants to scale so that `layer`'s output is scaled, or None."""
        if layer is None:
            return None
        if layer.op == "Add":  # a bias after a MatMul
            constants = [i for i, t in enumerate(layer.inputs) if isinstance(t, gs.Constant)]
            if len(layer.inputs) != 2 or len(constants) != 1:
                return None
            product = layer.inputs[1 - constants[0]]
            matmul = product.inputs[0] if self._alone(product) and product.inputs else None
            inner = self.scalable(matmul) if matmul is not None and matmul.op == "MatMul" else None
            return None if inner is None else [*inner, (layer, constants[0])]
        weights = {"MatMul": [i for i, t in enumerate(layer.inputs) if isinstance(t, gs.Constant)][:1],
                   "Gemm": [1, 2][:len(layer.inputs) - 1], "Conv": [1, 2][:len(layer.inputs) - 1]}.get(layer.op)
        if not weights or not all(isinstance(layer.inputs[i], gs.Constant) for i in weights):
            return None
        if any(np.asarray(layer.inputs[i].values).dtype.kind != "f" for i in weights):
            return None
        return [(layer, i) for i in weights]

    def target(self, x: gs.Tensor) -> list[tuple[gs.Node, int]] | None:
        """Where the scale of `x` goes: x's own layer, or an operand's layer when x is a product of two
        activations."""
        found = self.scalable(self._source(x))
        if found is not None:
            return found
        product = x.inputs[0] if self._alone(x) and x.inputs else None
        if product is None or product.op != "MatMul" or any(isinstance(t, gs.Constant) for t in product.inputs):
            return None
        for operand in product.inputs:
            found = self.scalable(self._source(operand))
            if found is not None:
                return found
        return None

    def scale(self, slots: list[tuple[gs.Node, int]], factor: float) -> None:
        for node, index in slots:
            old = node.inputs[index]
            values = np.asarray(old.values)
            scaled = (values.astype(np.float64) * factor).astype(values.dtype)
            node.inputs[index] = gs.Constant(self.model.unique_name(f"{old.name}_scaled"), scaled)


def fold_scales(model: Model) -> int:
    """Fold every scale the rules admit; returns how many."""
    folder = _Folder(model)
    folded = 0
    with GraphEdit(model.graph) as edit:
        for node in list(model.graph.nodes):
            found = _factor(node) if node.op in ("Mul", "Div") else None
            if found is None or node.outputs[0].name in folder.outputs:
                continue
            factor, x = found
            slots = folder.target(x)
            if slots is None:
                continue
            folder.scale(slots, factor)
            replace_uses(node.outputs[0], x)
            edit.remove(node)
            folded += 1
    return folded


class FoldScale(Pass):
    """Fold Mul/Div by a scalar constant into the weights of the linear layer that makes its input (attention
    scales)."""

    name = "fold-scale"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = fold_scales(model)
        return PassResult(modified=folded > 0, stats={"folded": folded})
