"""Constant folding: a node whose inputs are all constants is evaluated once, at compile time, and
its outputs become initializers (y = f(c1, ..., cn) -> y := value).

Nodes are visited in topological order, so a whole constant subexpression folds in one pass.
Evaluation runs the node alone in ONNX Runtime (its CPU kernels are the ones ORT would use to fold
the same node at session start, so results are bit-identical); onnx.reference.ReferenceEvaluator is
the fallback for ops ORT lacks. A node that neither can evaluate is left alone (folding is an
optimization, never a requirement).

`Shape` of a value whose shape is statically known (after shape inference, with the context's
input shapes) folds to its int64 dims, honouring start/end. So does a Gather or Slice (constant indices) that
picks only known dims out of a Shape of a value whose other dims are dynamic: torch's legacy exporter with
dynamic axes writes an attention's `q.shape[-1] ** 0.5` and a head split's `d // heads` that way, and left
unfolded the attention scale stayed a computed Div that `fold-scale` cannot take. An Equal of such dims with
negative constants folds too (a dim is never negative), and a Where over them with a constant mask becomes a
Concat: torch's `expand(B, -1, -1)` (irtool.passes.shape_select). When a Shape folds only
thanks to the context's input shapes, the model is specialized to them, so its inputs then declare them
(stat `inputs_pinned`).

Never folded:
  * DequantizeLinear, and QuantizeLinear feeding a DequantizeLinear: weights stay quantized (QDQ);
  * random ops (RandomNormal, RandomUniform, their -Like forms, Multinomial, Bernoulli);
  * nodes with subgraphs (If, Loop, Scan), non-default domains, and non-tensor results;
  * nodes with an output larger than `max_bytes` (checked on the inferred shape before evaluating,
    and on the value after);
  * with `keep-shared` (the default), a node whose result would be a second large copy (SHARED_COPY_BYTES or more)
    of a lookup table that stays in the model, read by a Gather with run-time indices: a tied LM head,
    MatMul(x, Transpose(E)) beside the embedding lookup Gather(E, ids), as torch.export writes it. Folding that
    Transpose stored E twice (a tied GPT-2-style test model: 2.6 -> 5.2 MB); ONNX Runtime folds it when it loads
    the model anyway. The quant pipelines fold it (`keep-shared=false`): their passes read a layer's weights as a
    constant, and insert-qdq then stores the head's copy as int8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from irtool.ir.model import Model, subgraphs_of
from irtool.ir.rewrite import GraphEdit, ValueTypes, is_default_domain, pin_input_shapes, static_shape, value_types
from irtool.ir.topo import toposort_graph
from irtool.passes.shape_select import dims_equal, select_pieces, shape_slice, slice_vector
from irtool.passmanager import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})
NEVER_FOLD = RANDOM_OPS | {"DequantizeLinear"}
DEFAULT_MAX_BYTES = 64 * 2**20
# Below this a copy costs little, and folded shape arithmetic and small constants stay what the passes read.
SHARED_COPY_BYTES = 64 * 2**10


MAX_ROUNDS = 16


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants and replace them with initializers."""

    name = "fold-constants"

    @dataclass(frozen=True)
    class Options:
        max_bytes: int = DEFAULT_MAX_BYTES
        fold_shapes: bool = True
        keep_shared: bool = True  # don't store a second large copy of a constant that stays (module docstring)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # Folding can make more shapes static (Shape -> Gather -> Div -> Slice chains), so sweep with
        # fresh shape inference until a sweep folds nothing.
        given = ctx.input_shapes or None
        folded, rounds, specialized = 0, 0, False
        while rounds < MAX_ROUNDS:
            rounds += 1
            types = value_types(model, given)
            swept, specializing = self._sweep(model, types, value_types(model) if given else types)
            folded, specialized = folded + swept, specialized or specializing
            if not swept:
                break
        pinned = pin_input_shapes(model, given, self.name) if given and specialized else []
        stats = {"nodes_folded": folded, **({"inputs_pinned": pinned} if pinned else {})}
        return PassResult(modified=folded > 0 or bool(pinned), preserved=(), stats=stats)

    def _sweep(self, model: Model, types: ValueTypes, own: ValueTypes) -> tuple[int, bool]:
        """(nodes folded, whether a fold specialized the model). `own`: the types from the model's own input
        shapes; a Shape folded only thanks to the context's input shapes specializes the model to them."""
        opsets = model.opset_imports
        folded, specialized = 0, False
        for graph in list(model.graphs()):
            toposort_graph(graph)
            with GraphEdit(graph) as edit:
                for node in list(graph.nodes):
                    if self._select(node, types, model):
                        folded += 1
                        continue
                    values = self._fold(node, types, opsets)
                    if values is None:
                        continue
                    specialized |= node.op == "Shape" and static_shape(own, node.inputs[0].name) is None
                    specialized |= (node.op in PICKS and _picked_dims(node, types) is not None
                                    and _picked_dims(node, own) is None)
                    outputs = list(_named(node.outputs))
                    edit.remove(node)  # detach first: to_constant turns the tensors into constants
                    for tensor, value in zip(outputs, values, strict=True):
                        tensor.to_constant(value)
                    folded += 1
        return folded, specialized

    def _select(self, node: gs.Node, types: ValueTypes, model: Model) -> bool:
        """Turn Where(constant mask, constant, Concat(pieces)) into the Concat of the picked pieces
        (irtool.passes.shape_select); True if it did."""
        if not (self.options.fold_shapes and node.op == "Where" and is_default_domain(node)):
            return False
        pieces = select_pieces(node, types, model.unique_name)
        if pieces is None:
            return False
        node.op, node.attrs = "Concat", {"axis": 0}
        node.inputs.clear()
        node.inputs.extend(pieces)
        return True

    def _fold(self, node: gs.Node, types: ValueTypes, opsets: dict[str, int]) -> list[np.ndarray] | None:
        """The output values of node if it may and can be folded, else None."""
        if self.options.fold_shapes and node.op == "Equal" and is_default_domain(node):
            decided = dims_equal(node, types)
            if decided is not None:
                return [decided]
        if self.options.fold_shapes and node.op == "Shape" and is_default_domain(node):
            shape = static_shape(types, node.inputs[0].name)
            if shape is not None:
                return [shape_slice(node, shape)]
        if self.options.fold_shapes and node.op in PICKS and is_default_domain(node):
            picked = _picked_dims(node, types)
            if picked is not None:
                return [picked]
        if not self._foldable(node, types):
            return None
        kept = self.options.keep_shared and _reads_kept(node)
        if kept and any(_expected_bytes(t, types) >= SHARED_COPY_BYTES for t in _named(node.outputs)):
            return None  # known large from the inferred shape: not evaluated (a GPT-2 table's transpose is 154 MB)
        values = evaluate(node, opsets)
        if values is None or any(v.nbytes > self.options.max_bytes for v in values):
            return None
        if kept and any(v.nbytes >= SHARED_COPY_BYTES for v in values):
            return None
        return values

    def _foldable(self, node: gs.Node, types: ValueTypes) -> bool:
        if not is_default_domain(node) or node.op in NEVER_FOLD or any(subgraphs_of(node)):
            return False
        if not _named(node.outputs) or not all(isinstance(t, gs.Constant) for t in _named(node.inputs)):
            return False
        if any(np.asarray(t.values).dtype == object for t in _named(node.inputs)):
            return False
        if node.op == "QuantizeLinear" and _feeds_dequantize(node):
            return False
        return all(_expected_bytes(t, types) <= self.options.max_bytes for t in _named(node.outputs))


def may_fold(model: Model) -> bool:
    """Whether a sweep could fold anything: a Shape, or a node whose inputs are all constants. Checking costs one
    walk over the nodes, where a sweep's shape inference cost the 224x224 ResNet-50 0.18 s."""
    return any(node.op == "Shape" or (not any(subgraphs_of(node)) and node.op not in NEVER_FOLD
                                      and all(isinstance(t, gs.Constant) for t in _named(node.inputs)))
               for node in model.nodes())


def _named(tensors: list[gs.Tensor]) -> list[gs.Tensor]:
    return [t for t in tensors if t.name]


def _reads_kept(node: gs.Node) -> bool:
    """Whether the node reads a lookup table that stays in the model after folding it: a Gather reads it with
    indices known only at run time (an embedding table)."""
    return any(isinstance(t, gs.Constant) and any(r is not node and not isinstance(r.inputs[1], gs.Constant)
                                                  for r in lookups(t))
               for t in _named(node.inputs))


def lookups(tensor: gs.Tensor) -> list[gs.Node]:
    """The Gathers that read `tensor` as their data (a table they pick rows of)."""
    return [reader for reader in tensor.outputs if reader.op == "Gather" and reader.inputs[0] is tensor]


def _feeds_dequantize(node: gs.Node) -> bool:
    return any(reader.op == "DequantizeLinear" for t in node.outputs for reader in t.outputs)


def _expected_bytes(tensor: gs.Tensor, types: ValueTypes) -> int:
    """Size from the inferred type when fully static; 0 (unknown, checked after evaluation) otherwise."""
    shape = static_shape(types, tensor.name)
    elem = types.get(tensor.name, (0, None))[0]
    if shape is None or not elem or elem == onnx.TensorProto.STRING:
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize
    return int(np.prod(shape, dtype=np.int64)) * itemsize


PICKS = ("Gather", "Slice")


def _picked_dims(node: gs.Node, types: ValueTypes) -> np.ndarray | None:
    """What a Gather or Slice with constant indices reads out of a Shape (default domain) when every dim it picks
    is known; None otherwise."""
    data = node.inputs[0] if node.inputs else None
    shape_node = data.inputs[0] if data is not None and len(data.inputs) == 1 else None
    if shape_node is None or shape_node.op != "Shape" or not is_default_domain(shape_node):
        return None
    if not all(isinstance(t, gs.Constant) for t in _named(node.inputs[1:])):
        return None
    entry = types.get(shape_node.inputs[0].name)
    if entry is None or entry[1] is None:
        return None
    dims = np.array([d if isinstance(d, int) and d >= 0 else -1 for d in entry[1]], np.int64)
    dims = shape_slice(shape_node, dims)  # what the Shape outputs, -1 for the dims not known
    try:
        if node.op == "Gather":
            picked = np.take(dims, np.asarray(node.inputs[1].values), axis=int(node.attrs.get("axis", 0)))
        else:
            picked = slice_vector(dims, [np.asarray(t.values) if t.name else None for t in node.inputs[1:]])
    except (IndexError, ValueError):  # an index out of range: ONNX Runtime's error to raise, not ours
        return None
    return np.asarray(picked, np.int64) if np.all(picked >= 0) else None


# --------------------------------------------------------------------------- evaluation
def evaluate(node: gs.Node, opsets: dict[str, int]) -> list[np.ndarray] | None:
    """Run node alone on its constant inputs: ONNX Runtime first, the ONNX reference evaluator second."""
    proto, feeds = _single_node_model(node, opsets)
    for runner in (_run_ort, _run_reference):
        try:
            outputs = runner(proto, feeds)
        except Exception as e:  # any evaluator failure only means "do not fold"
            log.debug("fold-constants: %s cannot evaluate %s (%s): %s", runner.__name__, node.name, node.op, e)
            continue
        if all(isinstance(v, np.ndarray) and v.dtype != object for v in outputs):
            # np.ascontiguousarray would turn 0-d results (scalar Gather indices) into shape (1,).
            return [np.require(v, requirements='C') for v in outputs]
        return None
    return None


def _single_node_model(node: gs.Node, opsets: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    feeds = {t.name: np.asarray(t.values) for t in _named(node.inputs)}
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for name, v in feeds.items()]
    # Untyped outputs: both runtimes infer them, and the node's own types may be unknown here.
    outputs = [onnx.helper.make_value_info(t.name, onnx.TypeProto()) for t in _named(node.outputs)]
    graph = onnx.helper.make_graph([OnnxExporter.export_node(node)], "fold", inputs, outputs)
    imports = [onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    proto = onnx.helper.make_model(graph, opset_imports=imports)
    # ignore_unknown: onnx knows no IR version for custom domains (com.microsoft, ...) and would raise.
    proto.ir_version = onnx.helper.find_min_ir_version_for(imports, ignore_unknown=True)
    return proto, feeds


def _run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run_reference(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(proto).run(None, feeds))
