"""Pass `fold-scale`: a Mul or Div by a scalar constant goes into the weights of the linear layer that makes
its input.

Attention scales its scores: softmax(q·kᵀ · 1/√d). Exporters write the scale as a Mul or Div after the scores
MatMul (timm, Hugging Face), or as two Muls by d^-1/4 on q and kᵀ before it (torch's scaled_dot_product_attention).
Scaling the q (or k) projection's weight and bias instead leaves one op less per block on the largest tensor of
the block ([batch, heads, tokens, tokens]): in float, in calibration (one tensor less to observe) and in the
quantized model, where the scale was a QLinearMul requantizing the scores (bench/quant_bench.py's ViT, 12
blocks: batch-1 INT8 latency 17.5 -> 16.5 ms on 1 thread, 15.0 -> 14.5 on 2; calibration ~0.05 s less).
Most vision transformers compute q, k and v in one fused projection; there the scale goes into the q columns.

Rules:
  - the scale is a Mul by a constant with one element (either operand) or a Div by one (second operand), finite
    and non-zero;
  - its input comes from a layer whose output, and every value on the way, has no other reader (but Shape or
    Size, which read no value) and is not a graph output; the way may pass data movement that keeps every
    value (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity);
  - the way may also pass one Split, or a Slice or Gather with constant positions, whose input only such
    pickers read: a fused qkv projection (timm's `qkv` Linear, torch's nn.MultiheadAttention, either exporter)
    split into q, k and v. Then only the layer's output columns the picked part holds are scaled. Which ones
    is worked out by moving a tensor of positions along the way with numpy, at the inferred static shapes (at
    two sizes of every dynamic dim, which must agree); the picked part must hold whole columns (every row of
    them), and the other pickers none of them. Anything else (a merge of rows into columns, overlapping
    slices, shapes inference cannot fix) is declined;
  - the layer is a MatMul with a constant operand (and the constant bias Add after it, which is scaled too), a
    Gemm with a constant B and a constant or no C, or a Conv with constant weights and bias (for a picked part:
    a MatMul with a constant second operand, or a Gemm, whose bias, if any, spans the columns);
  - a scale after a MatMul of two activations (the scores) moves to whichever operand such a layer makes.
The scaled weights are new constants (a weight shared with another layer keeps its values there). The
scale's output, when it is a graph output, is left alone (its name would change).
A Mul or Div by a constant with one value per column (shape [W] or [1, ..., 1, W], finite, non-zero) directly
after a MatMul with a constant weight (or its bias Add) or a Gemm goes into those columns the same way: the
layer scale of ConvNeXt and CaiT blocks (gamma · Linear(x)), which otherwise stayed a QLinearMul after the
layer's quantized output. (After a Conv, whose channels are not the last axis, fold-bn takes it.)
Contract: bounded (w·c is rounded once where x·w·c was rounded twice; exact for powers of two such as 1/√64).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.shapes import ShapeInfo
from irtool.ir.model import Model
from irtool.ir.rewrite import SHAPE_READERS, GraphEdit, replace_uses
from irtool.ir.skeleton import infer_types
from irtool.passmanager import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

# Data movement that keeps every value exactly once (placement.PERMUTATION_OPS).
THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# Pick a part of a tensor at constant positions: q, k and v out of a fused projection.
PICKERS = frozenset({"Split", "Slice", "Gather"})
# Stand-in sizes of a dynamic dim: the picked columns must come out the same at both.
DYNAMIC_SIZES = (2, 3)
# A layer output of more values (a large static batch) is not traced: 512 MB of positions.
MAX_POSITIONS = 1 << 26


def _scalar(tensor: gs.Tensor) -> float | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    if values.size != 1 or values.ndim > 1 or values.dtype.kind != "f":
        return None
    value = float(values.reshape(()))
    return value if np.isfinite(value) and value != 0.0 else None


def _per_column(tensor: gs.Tensor) -> np.ndarray | None:
    """A float constant of one finite, non-zero value per column: shape [W] or [1, ..., 1, W], W > 1."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    if values.dtype.kind != "f" or values.ndim == 0 or values.shape[-1] < 2 or any(d != 1 for d in values.shape[:-1]):
        return None
    vector = values.reshape(-1).astype(np.float64)
    return vector if np.isfinite(vector).all() and (vector != 0).all() else None


def _factor(node: gs.Node) -> tuple[float | np.ndarray, gs.Tensor, int] | None:
    """(the factor: a scalar, or a vector over the last axis; the scaled input; the constant's rank) of a Mul or Div
    by a constant."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    pairs = ((b, a),) if node.op == "Div" else ((b, a), (a, b)) if node.op == "Mul" else ()
    for c, x in pairs:
        if isinstance(x, gs.Constant):
            continue
        value = _scalar(c)
        if value is None:
            value = _per_column(c)
        if value is not None:
            return (1.0 / value if node.op == "Div" else value), x, np.asarray(c.values).ndim
    return None


@dataclass
class _Way:
    """A layer and the data movement from its output to a scaled tensor: (node, its output on the way), the
    layer's side first; `picker` is the Split/Slice/Gather on it, if any."""
    layer: gs.Node
    steps: list[tuple[gs.Node, gs.Tensor]]
    picker: gs.Node | None


def _ints(tensor: gs.Tensor | None) -> list[int] | None:
    if tensor is None:
        return None
    if not isinstance(tensor, gs.Constant):
        raise ValueError("positions not constant")
    return [int(v) for v in np.asarray(tensor.values).reshape(-1)]


def _picks_constant(node: gs.Node) -> bool:
    """Whether a picker's positions are constants (its first input is the tensor it picks from)."""
    return node.op in PICKERS and all(isinstance(t, gs.Constant) for t in node.inputs[1:])


def _slice(node: gs.Node, positions: np.ndarray) -> np.ndarray:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    if len(node.inputs) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        starts, ends, axes, steps = (_ints(t) for t in inputs[1:5])
    else:  # opset 1-9: attributes, no steps
        starts, ends, axes, steps = node.attrs.get("starts"), node.attrs.get("ends"), node.attrs.get("axes"), None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = [slice(None)] * positions.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[axis] = slice(start, end, step)  # numpy clamps out-of-range bounds as ONNX does
    return positions[tuple(index)]


def _move(node: gs.Node, out: gs.Tensor, positions: np.ndarray, shapes: ShapeInfo) -> np.ndarray:
    """Where `out`'s values sit in the layer's output, from where `node`'s input's values sit; raises ValueError
    where this cannot be told."""
    if node.op == "Transpose":
        return positions.transpose(node.attrs.get("perm") or list(range(positions.ndim))[::-1])
    if node.op == "Gather":
        return np.take(positions, np.asarray(node.inputs[1].values), axis=node.attrs.get("axis", 0))
    if node.op == "Slice":
        return _slice(node, positions)
    shape = shapes.static_shape(out.name)
    if shape is None:
        raise ValueError(f"no static shape for {out.name}")
    if node.op == "Split":
        axis = node.attrs.get("axis", 0) % positions.ndim
        sizes = [shapes.static_shape(o.name) for o in node.outputs]
        if any(s is None for s in sizes):
            raise ValueError("split sizes unknown")
        k = node.outputs.index(out)
        start = sum(s[axis] for s in sizes[:k])
        return np.take(positions, np.arange(start, start + sizes[k][axis]), axis=axis)
    return positions.reshape(shape)  # the other THROUGH ops keep the row-major order


def _picked_columns(way: _Way, shapes: ShapeInfo) -> np.ndarray | None:
    """The layer output's columns (its last axis) that the scaled tensor holds, when it holds every row of them
    and no other picker of the same input reads any of them; None otherwise."""
    shape = shapes.static_shape(way.layer.outputs[0].name)
    if not shape or 0 in shape or np.prod(shape) > MAX_POSITIONS:
        return None
    width, rows = shape[-1], int(np.prod(shape[:-1]))
    positions = np.arange(rows * width).reshape(shape)
    others: list[np.ndarray] = []
    try:
        for node, out in way.steps:
            if node is way.picker:
                others = [_move(r, part, positions, shapes) for r in node.inputs[0].outputs
                          if r is not node and r.op not in SHAPE_READERS for part in r.outputs]
            positions = _move(node, out, positions, shapes)
    except (ValueError, IndexError, TypeError):
        return None
    if shapes.static_shape(way.steps[-1][1].name) != list(positions.shape):
        return None
    flat = positions.reshape(-1)
    if np.bincount(flat, minlength=1).max(initial=0) > 1:  # a value twice: not data movement
        return None
    per_column = np.bincount(flat % width, minlength=width)
    columns = np.flatnonzero(per_column)
    if not columns.size or (per_column[columns] != rows).any():  # some rows of a column only: rows merged into columns
        return None
    picked = per_column > 0
    if any(picked[other.reshape(-1) % width].any() for other in others):
        return None
    return columns


def _shape_views(model: Model, given: dict[str, list[int]]) -> list[ShapeInfo]:
    """Inferred shapes with every input dim static: as the model (or `given`) fixes them, else once per stand-in
    size of DYNAMIC_SIZES."""
    proto = model.to_proto()
    dynamic = [t for t in model.graph.inputs if t.name not in given
               and (t.shape is None or any(not isinstance(d, int) or d < 0 for d in t.shape))]
    if not dynamic:
        return [ShapeInfo(infer_types(proto, given or None))]
    if any(t.shape is None for t in dynamic):
        return []
    views = []
    for size in DYNAMIC_SIZES:
        shapes = dict(given)
        shapes.update({t.name: [d if isinstance(d, int) and d >= 0 else size for d in t.shape] for t in dynamic})
        views.append(ShapeInfo(infer_types(proto, shapes)))
    return views


def _column_factor(node: gs.Node, index: int, factor: np.ndarray) -> np.ndarray | None:
    """How a per-column factor (shape [width]) multiplies the constant in `node`'s input `index`, or None when
    that constant does not span the columns."""
    values = np.asarray(node.inputs[index].values)
    width = factor.size
    if node.op == "Gemm" and index == 1:
        trans_b = node.attrs.get("transB", 0)
        if values.ndim != 2 or values.shape[0 if trans_b else 1] != width:
            return None
        return factor[:, None] if trans_b else factor
    if node.op == "MatMul" and index == 1:
        return factor if values.ndim >= 2 and values.shape[-1] == width else None
    if node.op in ("Add", "Gemm"):  # the bias
        return factor if values.ndim >= 1 and values.shape[-1] == width else None
    return None


class _Folder:
    def __init__(self, model: Model, edit: GraphEdit, input_shapes: dict[str, list[int]]):
        self.model, self.edit, self.input_shapes = model, edit, input_shapes
        self.outputs = {t.name for t in model.graph.outputs}
        self._views: list[ShapeInfo] | None = None

    def views(self) -> list[ShapeInfo]:
        if self._views is None:
            self.edit.flush()  # the proto shape inference reads must not hold removed nodes
            self._views = _shape_views(self.model, self.input_shapes)
        return self._views

    def _alone(self, tensor: gs.Tensor) -> bool:
        """Read by one node only, not counting Shape and Size (the scale changes no shape: torch's legacy exporter
        reads a projection's shape to split it into heads), and not a graph output."""
        readers = [c for c in tensor.outputs if c.op not in SHAPE_READERS]
        return isinstance(tensor, gs.Variable) and len(readers) == 1 and tensor.name not in self.outputs

    def _picked_only(self, tensor: gs.Tensor) -> bool:
        """Read only by pickers at constant positions (and Shape or Size), and not a graph output."""
        readers = [c for c in tensor.outputs if c.op not in SHAPE_READERS]
        return tensor.name not in self.outputs and all(_picks_constant(r) for r in readers)

    def _way(self, tensor: gs.Tensor) -> _Way | None:
        """The layer that makes `tensor` through value-keeping data movement and at most one picker, all on
        values nobody else reads (the picker's input: only pickers)."""
        steps: list[tuple[gs.Node, gs.Tensor]] = []
        picker = None
        while isinstance(tensor, gs.Variable) and tensor.inputs:
            at_picker = picker is not None and steps[-1][0] is picker
            if not (self._picked_only(tensor) if at_picker else self._alone(tensor)):
                return None
            producer = tensor.inputs[0]
            if picker is None and _picks_constant(producer):
                picker = producer
            elif producer.op not in THROUGH:
                return _Way(producer, steps[::-1], picker)
            steps.append((producer, tensor))
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

    def _factors(self, way: _Way | None, factor: float) -> list[tuple[gs.Node, int, np.ndarray]] | None:
        """(node, input index, factor to multiply that constant by) that scale `way`'s tensor by `factor`."""
        slots = self.scalable(way.layer) if way is not None else None
        if slots is None:
            return None
        if way.picker is None:
            return [(node, index, np.float64(factor)) for node, index in slots]
        found = [_picked_columns(way, shapes) for shapes in self.views()]
        if not found or found[0] is None or any(c is None or not np.array_equal(c, found[0]) for c in found):
            if len(found) > 1:  # traced at stand-in sizes of the dynamic input dims
                log.info("fold-scale: kept the scale after %s: which of %s's columns it picks could not be told "
                         "at stand-in sizes of the dynamic input dims (fix them with --input-shape)",
                         way.picker.name, way.layer.name)
            return None
        width = self.views()[0].static_shape(way.layer.outputs[0].name)[-1]
        per_column = np.ones(width)
        per_column[found[0]] = factor
        factors = [(node, index, _column_factor(node, index, per_column)) for node, index in slots]
        return None if any(f is None for _, _, f in factors) else factors

    def columns(self, x: gs.Tensor, factor: np.ndarray, rank: int) -> list[tuple[gs.Node, int, np.ndarray]] | None:
        """Where a per-column factor (held in a constant of `rank` dims) of `x` goes: the MatMul (+ bias Add) or Gemm
        that makes x itself, when the product keeps x's rank."""
        way = self._way(x)
        if way is None or way.steps or way.picker is not None or way.layer.op == "Conv":
            return None
        if rank > 1 and len(self._shape(x) or ()) < rank:
            return None
        slots = self.scalable(way.layer)
        factors = [(node, index, _column_factor(node, index, factor)) for node, index in slots or []]
        return None if not factors or any(f is None for _, _, f in factors) else factors

    def _shape(self, x: gs.Tensor) -> list | None:
        if x.shape is not None:
            return x.shape
        views = self.views()
        return views[0].shape(x.name) if views else None

    def target(self, x: gs.Tensor, factor: float | np.ndarray, rank: int = 0) -> list | None:
        """Where the scale of `x` goes: x's own layer, or an operand's layer when x is a product of two
        activations."""
        if np.ndim(factor):
            return self.columns(x, factor, rank)
        found = self._factors(self._way(x), factor)
        if found is not None:
            return found
        product = x.inputs[0] if self._alone(x) and x.inputs else None
        if product is None or product.op != "MatMul" or any(isinstance(t, gs.Constant) for t in product.inputs):
            return None
        for operand in product.inputs:
            found = self._factors(self._way(operand), factor)
            if found is not None:
                return found
        return None

    def scale(self, factors: list[tuple[gs.Node, int, np.ndarray]]) -> None:
        for node, index, factor in factors:
            old = node.inputs[index]
            values = np.asarray(old.values)
            scaled = (values.astype(np.float64) * factor).astype(values.dtype)
            node.inputs[index] = gs.Constant(self.model.unique_name(f"{old.name}_scaled"), scaled)


def fold_scales(model: Model, input_shapes: dict[str, list[int]] | None = None) -> int:
    """Fold every scale the rules admit; returns how many. `input_shapes` fixes dynamic input dims for the
    shape inference a picked part needs (`--input-shape`)."""
    folded = 0
    with GraphEdit(model.graph) as edit:
        folder = _Folder(model, edit, dict(input_shapes or {}))
        for node in list(model.graph.nodes):
            found = _factor(node) if node.op in ("Mul", "Div") and node.outputs else None
            if found is None or node.outputs[0].name in folder.outputs:
                continue
            factor, x, rank = found
            factors = folder.target(x, factor, rank)
            if factors is None:
                continue
            folder.scale(factors)
            replace_uses(node.outputs[0], x)
            edit.remove(node)
            folded += 1
    return folded


class FoldScale(Pass):
    """Fold a Mul/Div by a scalar or per-column constant (attention, layer scales) into the linear layer before it."""

    name = "fold-scale"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = fold_scales(model, ctx.input_shapes)
        return PassResult(modified=folded > 0, stats={"folded": folded})
