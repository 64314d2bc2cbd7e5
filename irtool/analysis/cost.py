"""Analysis `cost`: parameters, weight bytes, MACs per node and a peak-activation estimate.

Conventions (say them out loud, because cost tools disagree by 2x on each):

- **MACs, not FLOPs.** One multiply-accumulate counts 1; a FLOP counter reports about twice our
  numbers for Conv/Gemm/MatMul. Bias additions of Conv/Gemm are not counted.
- **Conv**: N·C_out·prod(out spatial)·(C_in/groups)·prod(kernel) = out elements × prod(W.shape[1:]).
- **ConvTranspose**: every input pixel scatters a kernel into C_out/groups channels:
  N·C_in·prod(in spatial)·(C_out/groups)·prod(kernel) = in elements × prod(W.shape[1:]).
- **Gemm**: M·N·K after transA/transB. **MatMul**: prod(broadcast batch dims)·M·N·K, with 1-D operands
  promoted as numpy does ([K] @ [..,K,N] is a 1xK row, [..,M,K] @ [K] a Kx1 column).
- **Elementwise ops and activations** (Add, Mul, Relu, Sigmoid, Gelu, Where, Quantize/Dequantize...):
  1 per output element, whatever the op costs in instructions.
- **Normalization**: BatchNormalization 2 per element (inference: scale and shift); Instance-, Layer- and
  GroupNormalization 4 per element (mean and variance over the data, then scale and shift).
- **Pooling**: prod(kernel) per output element; global pooling reads every input element once.
- **Softmax / LogSoftmax**: 3 per element (exp, sum, divide). **Reduce\\***: 1 per input element.
- **Data movement** (Reshape, Transpose, Concat, Gather, Slice, Cast, ...): 0.

Ops with no rule count 0 and are listed in `unsupported_ops`; nodes whose rule needs a shape that is
not static (give `input_shapes` to resolve symbolic dims) are listed in `unknown_macs`. Control flow
(If/Loop/Scan) cannot be costed statically and is listed as unknown; bodies count in the histogram only.

Parameters are the elements of every initializer (constant tensor) in the model, subgraphs included,
shape constants too; `weight_bytes` is their size in bytes. The peak-activation estimate walks the main
graph in topological order, allocates each node's outputs, keeps every value alive until its last
consumer has run (graph outputs until the end) and reports the largest live total. Graph inputs are
live from the start; weights are not activations, nor are values computed from weights alone (the
DequantizeLinear of a quantized weight: a runtime folds it or fuses it into the integer kernel). Values of
unknown size count 0.

Adding an op is adding one entry to `MAC_RULES` (see `mac_rule`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.shapes import ShapeInfo, Shapes
from irtool.ir.model import Model
from irtool.ir.topo import outer_uses, topo_order
from irtool.passmanager import Analysis, PassContext

log = logging.getLogger(__name__)


class DynamicShape(Exception):
    """A rule needed a static shape that the model does not have."""


@dataclass
class NodeCost:
    name: str
    op: str
    macs: int | None
    params: int
    output_bytes: int


@dataclass
class CostReport:
    total_params: int
    nonzero_params: int
    weight_bytes: int
    total_macs: int
    peak_activation_bytes: int
    per_node: list[NodeCost] = field(default_factory=list)
    op_histogram: dict[str, int] = field(default_factory=dict)
    unknown_macs: list[str] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready; node order is the topological order, op names sorted."""
        data = asdict(self)
        data["op_histogram"] = dict(sorted(self.op_histogram.items()))
        data["unsupported_ops"] = sorted(self.unsupported_ops)
        return data


class Shape:
    """Static shapes of tensors as seen by the rules; raises DynamicShape when one is not static."""

    def __init__(self, info: ShapeInfo):
        self.info = info

    def __call__(self, tensor: gs.Tensor) -> list[int]:
        dims = self.maybe(tensor)
        if dims is None:
            raise DynamicShape(tensor.name)
        return dims

    def maybe(self, tensor: gs.Tensor) -> list[int] | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        dims = self.info.static_shape(tensor.name)
        static = tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)
        if dims is None and static:
            dims = list(tensor.shape)
        return dims


MacRule = Callable[[gs.Node, Shape], int]
MAC_RULES: dict[str, MacRule] = {}


def mac_rule(*ops: str) -> Callable[[MacRule], MacRule]:
    def register(rule: MacRule) -> MacRule:
        for op in ops:
            MAC_RULES[op] = rule
        return rule
    return register


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _elements(node: gs.Node, shape: Shape) -> int:
    return _prod(shape(node.outputs[0]))


# ----------------------------------------------------------------------------------------- rules
def _conv_rule(w_index: int) -> MacRule:
    def rule(node: gs.Node, shape: Shape) -> int:
        return _prod(shape(node.outputs[0])) * _prod(shape(node.inputs[w_index])[1:])
    return rule


mac_rule("Conv", "ConvInteger")(_conv_rule(1))
mac_rule("QLinearConv")(_conv_rule(3))


@mac_rule("ConvTranspose")
def _conv_transpose(node: gs.Node, shape: Shape) -> int:
    return _prod(shape(node.inputs[0])) * _prod(shape(node.inputs[1])[1:])


@mac_rule("Gemm")
def _gemm(node: gs.Node, shape: Shape) -> int:
    a, b = shape(node.inputs[0]), shape(node.inputs[1])
    m, k = (a[1], a[0]) if node.attrs.get("transA", 0) else (a[0], a[1])
    n = b[0] if node.attrs.get("transB", 0) else b[1]
    return m * n * k


def matmul_macs(a: list[int], b: list[int]) -> int:
    """numpy matmul semantics: 1-D operands are promoted, batch dims broadcast."""
    a = [1, *a] if len(a) == 1 else a
    b = [*b, 1] if len(b) == 1 else b
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return _prod(batch) * a[-2] * a[-1] * b[-1]


def _matmul_rule(a_index: int, b_index: int) -> MacRule:
    def rule(node: gs.Node, shape: Shape) -> int:
        return matmul_macs(shape(node.inputs[a_index]), shape(node.inputs[b_index]))
    return rule


mac_rule("MatMul", "MatMulInteger")(_matmul_rule(0, 1))
mac_rule("QLinearMatMul")(_matmul_rule(0, 3))


def _per_element(factor: int) -> MacRule:
    def rule(node: gs.Node, shape: Shape) -> int:
        return factor * _elements(node, shape)
    return rule


ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Exp", "Log", "Erf", "Sin", "Cos", "Tan", "Floor", "Ceil", "Round", "Sign",
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Softplus", "Softsign", "Mish", "Clip", "ThresholdedRelu",
    "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd",  # com.microsoft (fuse-gelu, ORT-optimized transformers)
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
    "QuantizeLinear", "DequantizeLinear", "Resize", "Upsample",
)
mac_rule(*ELEMENTWISE)(_per_element(1))
mac_rule("BatchNormalization")(_per_element(2))
mac_rule("InstanceNormalization", "LayerNormalization", "GroupNormalization")(_per_element(4))
mac_rule("Softmax", "LogSoftmax")(_per_element(3))


@mac_rule("LSTM", "GRU", "RNN")
def _recurrent(node: gs.Node, shape: Shape) -> int:
    """The matrix products: every step and direction multiplies the input by W [D, G·H, I] and the hidden state
    by R [D, G·H, H] (the gates' elementwise work is left out)."""
    x, w, r = shape(node.inputs[0]), shape(node.inputs[1]), shape(node.inputs[2])
    return x[0] * x[1] * w[0] * w[1] * (w[2] + r[2])


@mac_rule("MaxPool", "AveragePool", "LpPool")
def _pool(node: gs.Node, shape: Shape) -> int:
    return _elements(node, shape) * _prod(node.attrs["kernel_shape"])


@mac_rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceSum", "ReduceMax",
          "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
          "ReduceLogSumExp", "ArgMax", "ArgMin")
def _reads_input_once(node: gs.Node, shape: Shape) -> int:
    return _prod(shape(node.inputs[0]))


DATA_MOVEMENT = (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather",
    "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Shape", "Size", "Identity", "Cast",
    "CastLike", "Constant", "ConstantOfShape", "Expand", "Pad", "Tile", "Range", "Dropout", "DepthToSpace",
    "SpaceToDepth", "NonZero", "TopK",
)
mac_rule(*DATA_MOVEMENT)(lambda node, shape: 0)

CONTROL_FLOW = ("If", "Loop", "Scan")


# ----------------------------------------------------------------------------------------- analysis
class Cost(Analysis):
    """Parameters, weight bytes, MACs per node and peak activation memory."""

    name = "cost"

    def compute(self, model: Model, ctx: PassContext) -> CostReport:
        return build_report(model, ctx.analysis(Shapes, model))


def model_cost(model: Model, input_shapes: dict[str, list[int]] | None = None) -> CostReport:
    """The cost report of `model`, with symbolic input dims fixed by `input_shapes`."""
    return Cost().compute(model, PassContext(input_shapes=dict(input_shapes or {})))


def build_report(model: Model, info: ShapeInfo) -> CostReport:
    shape = Shape(info)
    nodes = [model.graph.nodes[i] for i in topo_order(model.graph.nodes)]
    per_node, unknown, unsupported = [], [], set()
    for node in nodes:
        macs = node_macs(node, shape)
        if macs is None:
            unknown.append(node.name)
        if node.op not in MAC_RULES and node.op not in CONTROL_FLOW:
            unsupported.add(node.op)
        params = sum(_prod(t.shape) for t in _unique_constants(node.inputs))
        out_bytes = sum(_value_bytes(t, shape) or 0 for t in node.outputs)
        per_node.append(NodeCost(node.name, node.op, macs, params, out_bytes))
    total, nonzero, nbytes = _weight_totals(model)
    return CostReport(
        total_params=total, nonzero_params=nonzero, weight_bytes=nbytes,
        total_macs=sum(n.macs or 0 for n in per_node),
        peak_activation_bytes=peak_activation_bytes(model.graph, nodes, shape),
        per_node=per_node,
        op_histogram=dict(sorted(Counter(n.op for n in model.nodes()).items())),
        unknown_macs=unknown, unsupported_ops=sorted(unsupported),
    )


def macs_by_node(model: Model, info: ShapeInfo) -> dict[str, int | None]:
    """node_macs of every main-graph node, without the rest of a report: its weight totals read every weight
    (count_nonzero over ResNet-50's 25M: 0.055 s, a seventh of prune's time there)."""
    shape = Shape(info)
    return {node.name: node_macs(node, shape) for node in model.graph.nodes}


def node_macs(node: gs.Node, shape: Shape) -> int | None:
    """MACs of one node; None when a shape it needs is dynamic or the node is control flow."""
    if node.op in CONTROL_FLOW:
        return None
    rule = MAC_RULES.get(node.op)
    if rule is None:
        log.debug("cost: no MAC rule for %s (%s), counted as 0", node.op, node.name)
        return 0
    try:
        return int(rule(node, shape))
    except DynamicShape as e:
        log.debug("cost: %s needs the static shape of %s", node.name, e)
        return None


def _unique_constants(tensors) -> list[gs.Constant]:
    seen: dict[str, gs.Constant] = {}
    for t in tensors:
        if isinstance(t, gs.Constant):
            seen.setdefault(t.name, t)
    return list(seen.values())


def _weight_totals(model: Model) -> tuple[int, int, int]:
    """(elements, nonzero elements, bytes) over every distinct initializer in the model."""
    constants: dict[str, gs.Constant] = {}
    for graph in model.graphs():
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant):
                constants.setdefault(name, tensor)
    total = nonzero = nbytes = 0
    for tensor in constants.values():
        values = np.asarray(tensor.values)
        total += values.size
        nonzero += int(np.count_nonzero(values))
        nbytes += values.nbytes
    return total, nonzero, nbytes


def _value_bytes(tensor: gs.Tensor, shape: Shape) -> int | None:
    dims = shape.maybe(tensor)
    dtype = shape.info.dtype(tensor.name)
    if dtype is None and tensor.dtype is not None:
        try:
            dtype = np.dtype(tensor.dtype)
        except TypeError:
            dtype = None
    if dims is None or dtype is None:
        return None
    return _prod(dims) * dtype.itemsize


def _computed_from_weights(nodes: list[gs.Node]) -> set[str]:
    """Names of the values that topologically sorted `nodes` compute from constants alone."""
    derived: set[str] = set()
    for node in nodes:
        used = outer_uses(node)
        if (used or node.op == "Constant") and all(isinstance(t, gs.Constant) or t.name in derived for t in used):
            derived.update(t.name for t in node.outputs if t.name)
    return derived


def peak_activation_bytes(graph: gs.Graph, nodes: list[gs.Node], shape: Shape) -> int:
    """Largest sum of live activation bytes while running `nodes` (topologically sorted) in order."""
    last_use: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for t in outer_uses(node):
            if not isinstance(t, gs.Constant):
                last_use[t.name] = step
    keep = {t.name for t in graph.outputs}
    weights = _computed_from_weights(nodes)
    live: dict[str, int] = {t.name: _value_bytes(t, shape) or 0 for t in graph.inputs}
    peak = sum(live.values())
    for name in [n for n in live if n not in last_use and n not in keep]:
        del live[name]
    for step, node in enumerate(nodes):
        for t in node.outputs:
            if t.name and t.name not in weights:
                live[t.name] = _value_bytes(t, shape) or 0
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= step and n not in keep]:
            del live[name]
    return peak
