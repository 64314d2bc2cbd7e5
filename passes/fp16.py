"""Convert float32 weights and computation to float16, keeping the model's interface in float32.

Every value of the main graph gets a home type. A node runs in float16 unless it is blocked; in a
float16 node every float32 input or output slot whose ONNX type constraint admits float16 becomes
float16 (a slot that does not, such as Resize's `scales` or LayerNormalization's `Mean`, stays
float32). Then each reader gets the type it needs:

    float32 constant read by a float16 slot    c' = clip(c, -65504, 65504) stored as float16
    float16 value read by a float32 slot       Cast(v, to=FLOAT)       (one Cast per value)
    float32 value read by a float16 slot       Cast(v, to=FLOAT16)     (one Cast per value)

so blocked nodes are wrapped in Casts and with `keep-io-types` the graph inputs are Cast to float16
right after the input and the outputs Cast back to float32 right before the output, under the
original names. float16 has a 10-bit mantissa: each rounding adds a relative error of at most
2^-11 ≈ 4.9e-4, and its largest finite value is 65504.

Quantized models (`quant-trt,fp16`, the INT8 + FP16 recipe for TensorRT 11, whose networks are strongly
typed): QuantizeLinear and DequantizeLinear take float16 values and scales from opset 19 on. At an older
opset a DequantizeLinear writes float32, so a Cast sat between it and the Conv, Gemm or MatMul it feeds, and
TensorRT fuses a DequantizeLinear into an INT8 layer only where it feeds the layer directly (irtool
trt-check warns `cast-after-dq`). A model with Q/DQ below opset 19 is therefore converted to opset 19 first
(onnx.version_converter, exact; stat `opset_upgraded`), and its Q/DQ become float16: each scale is rounded
to float16 (at most 2^-11 relative; a Q and its DQ read the same scale, so they stay a pair). A Q/DQ whose
scale float16 holds with fewer than 11 bits (below 2^-14) or not at all stays float32, Cast-wrapped, with a
warning (stat `qdq_kept_fp32`). A Concat whose inputs are all dequantized and whose output a Q alone reads
stays float32 with those Q/DQ (stat `qdq_concats_kept_fp32`; a DQ another node reads too is copied for it),
which needs no Cast since their other sides are integers: in float16, ONNX Runtime's CPU provider fuses that
pattern into a QLinearConcat, which takes float32 scales only, and refused to load the model.

Overflow policy: a finite constant with |c| > 65504 is clipped to ±65504 (logged as a warning and
counted in `constants_clipped`): such constants are almost always "minus infinity" fills for
attention masks, where -65504 does the same job; ±inf and NaN are kept. Values computed at run time
cannot be checked here; block the op or node that overflows (`block-ops`, `block-nodes`).

Blocked (kept in float32): ops in `block-ops` (default: the standard-domain ops of onnxconverter-
common's DEFAULT_OP_BLOCK_LIST, whose float16 results are wrong or unsupported: index-producing and
accumulating ops and Range, whose schema has no float16), nodes whose name matches a `block-nodes`
regex, nodes of other domains, nodes owning subgraphs (If/Loop/Scan bodies are not converted),
nodes whose output type comes from an attribute other than Cast's `to` and the `value` of Constant
and ConstantOfShape (RandomNormal's `dtype`, ...), nodes with a float value of unknown type, and
Casts that already convert to or from float16 (they are boundaries, so a second run changes nothing).
Only float32 is converted; float64 and integer values are untouched.

ONNX Runtime 1.31's CPU provider runs every op this pass converts, but has native float16 kernels
only for data movement, LayerNormalization and Clip/Min/Max: around the rest (Conv, MatMul, Gemm,
Softmax, ...) it inserts Casts to float32 itself and drops the f16->f32->f16 pairs that result, so
on CPU mostly the weights are rounded and the arithmetic stays float32. The pass halves the weight
bytes there; float16 speed needs a GPU provider.

`fp32` is the same rewrite the other way, and exact (every float16 is a float32): a float16 model's
weights and computation become float32, its interface stays float16 (Casts at the inputs and outputs;
`keep-io-types=false` makes it float32). Casts to float16 inside become float32 no-ops that
`eliminate-identity` removes. INT8 placement and ONNX Runtime's integer kernels take float32 only: on a
float16 model insert-qdq quantized nothing (ONNX Runtime's quantize_static leaves it float as well), so
`quant` and `quant-trt` run `fp32` first; on a float32 model it changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir import io
from irtool.ir.model import Model
from irtool.ir.rewrite import ValueTypes, is_default_domain, value_types
from irtool.ir.topo import toposort_graph
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2^-14; below it float16 keeps fewer than 11 bits
# QuantizeLinear and DequantizeLinear take float16 values and scales from opset 19 on (see the module docstring).
QDQ_FLOAT16_OPSET = 19
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DEFAULT_BLOCK_OPS = ("NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum", "Min", "Max", "Upsample",
                     "RandomUniformLike")
# Float attributes that fix an output type this pass does not rewrite (RandomNormal's dtype, ...).
_FIXED_TYPE_ATTRIBUTES = ("dtype", "value_float", "value_floats")


class Float16(Pass):
    """Convert float32 weights and computation to float16, Casting at the model's inputs and outputs."""

    name = "fp16"

    @dataclass(frozen=True)
    class Options:
        block_ops: tuple[str, ...] = DEFAULT_BLOCK_OPS
        block_nodes: tuple[Regex, ...] = ()
        keep_io_types: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _convert(model, ctx, self.options, FLOAT16)


class Float32(Pass):
    """Convert float16 weights and computation to float32 (exact), Casting at the model's inputs and outputs."""

    name = "fp32"

    @dataclass(frozen=True)
    class Options:
        keep_io_types: bool = True
        block_ops: tuple[str, ...] = ()  # nothing overflows or loses precision in float32
        block_nodes: tuple[Regex, ...] = ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _convert(model, ctx, self.options, FLOAT)


def _convert(model: Model, ctx: PassContext, options, target: int) -> PassResult:
    if target == FLOAT and not has_float16_source(model):
        return PassResult(modified=False, stats={"nodes_converted": 0})  # without shape inference (ResNet-50: 0.1 s)
    upgraded = target == FLOAT16 and model.opset < QDQ_FLOAT16_OPSET and any(n.op in QDQ_OPS for n in model.nodes())
    if upgraded:
        _upgrade(model, QDQ_FLOAT16_OPSET)
    held = _hold_quantized_concats(model) if target == FLOAT16 else set()
    types = value_types(model, ctx.input_shapes or None)
    plans = {id(node): plan for node in model.graph.nodes if id(node) not in held
             and (plan := _plan(node, types, model.opset, options, target)) is not None}
    if not plans:
        return PassResult(modified=False, stats={"nodes_converted": 0})
    rewriter = _Rewriter(model, types, plans, ctx, target)
    rewriter.apply(options.keep_io_types)
    stats = rewriter.stats()
    if target == FLOAT16:
        kept = [n.name for n in model.graph.nodes if n.op in QDQ_OPS and _scale_beyond_float16(n)]
        if kept:
            ctx.logger.warning("fp16: %d Q/DQ node(s) keep float32 scales, beyond float16's normal range (%s, ...), "
                               "with Casts around them (TensorRT does not fuse a layer such a DequantizeLinear "
                               "feeds)", len(kept), kept[0])
        concats = sum(node.op == "Concat" for node in model.graph.nodes if id(node) in held)
        stats.update(qdq_kept_fp32=len(kept), opset_upgraded=int(upgraded), qdq_concats_kept_fp32=concats)
    return PassResult(modified=True, preserved=(), stats=stats)


def _upgrade(model: Model, opset: int) -> None:
    """Bring `model` to `opset` in place (onnx.version_converter, as on load)."""
    proto = io.upgrade_opset(model.to_proto(), model.source or "<model>", keep_input=False, target=opset,
                             why="for float16 Q/DQ")
    model.graph = Model.from_proto(proto, checked=True, owned=True).graph
    model.forget_names()


def _hold_quantized_concats(model: Model) -> set[int]:
    """ids of each Concat whose inputs all come from a DequantizeLinear and whose output a QuantizeLinear alone
    reads, of that Q and of those DQs, to keep float32: they need no Cast (their other sides are integers), where
    in float16 ONNX Runtime's CPU provider fuses them into a QLinearConcat, which takes float32 scales only, and
    refused to load the model. A DQ something else reads too is copied for the Concat, so that reader still
    gets a float16 DQ and the Concat no Cast."""
    held: set[int] = set()
    for node in list(model.graph.nodes):
        sources = [t.inputs[0] if len(t.inputs) == 1 else None for t in node.inputs]
        readers = node.outputs[0].outputs if node.op == "Concat" else []
        if not (sources and readers and all(s is not None and s.op == "DequantizeLinear" for s in sources)
                and len(readers) == 1 and readers[0].op == "QuantizeLinear"):
            continue
        held |= {id(node), id(readers[0])}
        for index, source in enumerate(sources):
            if any(c is not node for c in source.outputs[0].outputs):
                source = _own_copy(model, source, node, index)
            held.add(id(source))
    return held


def _own_copy(model: Model, dequantize: gs.Node, reader: gs.Node, index: int) -> gs.Node:
    """A copy of `dequantize` whose output only input `index` of `reader` reads."""
    out = dequantize.outputs[0]
    copy_out = gs.Variable(model.unique_name(f"{out.name}_for_{reader.name}"), dtype=out.dtype, shape=out.shape)
    copy = gs.Node(dequantize.op, model.unique_name(f"{dequantize.name}_for_{reader.name}"),
                   dict(dequantize.attrs), list(dequantize.inputs), [copy_out])
    model.graph.nodes.append(copy)
    reader.inputs[index] = copy_out
    return copy


def _scale_beyond_float16(node: gs.Node) -> bool:
    """A Q/DQ whose constant scale float16 cannot hold to 11 bits (or at all): it stays float32."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(scale, gs.Constant):
        return False
    values = np.abs(np.asarray(scale.values, np.float64))
    return bool(values.size) and bool((values < FP16_MIN_NORMAL).any() or (values > FP16_MAX).any())


def has_float16_source(model: Model) -> bool:
    """Whether a float16 value can arise: a float16 graph input or constant, or a node that makes one from an
    attribute (Cast's `to`, a Constant's value, RandomNormal's `dtype`, ...)."""
    for graph in model.graphs():
        if any(_is_half(t) for t in graph.inputs):
            return True
        for node in graph.nodes:
            if any(_is_half(t) for t in node.inputs) or any(_is_half(v) for v in node.attrs.values()) \
                    or FLOAT16 in (node.attrs.get("to"), node.attrs.get("dtype")):
                return True
    return False


def _is_half(value) -> bool:
    return isinstance(value, gs.Tensor) and value.dtype is not None and _elem_kind(value.dtype) == FLOAT16


def _elem_kind(dtype) -> int:
    return dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# --------------------------------------------------------------------------- which slots turn float16
@dataclass
class _Plan:
    """The slots of one node that change type (float32 to float16 for `fp16`, the other way for `fp32`)."""

    inputs: set[int] = field(default_factory=set)
    outputs: set[int] = field(default_factory=set)


def _plan(node: gs.Node, types: ValueTypes, opset: int, options, target: int) -> _Plan | None:
    """The node's slots that turn `target`, or None when it keeps its types (blocked, or nothing to convert)."""
    source = _other(target)
    if _blocked(node, options) or (target == FLOAT16 and _is_fp16_boundary(node, types)):
        return None
    if target == FLOAT16 and node.op in QDQ_OPS and _scale_beyond_float16(node):
        return None
    schema = _schema(node, opset)
    if schema is None:
        return None
    plan = _Plan()
    for index, tensor in enumerate(node.inputs):
        kind = _elem_type(tensor, types)
        if kind is None and tensor.name:
            return None  # a value of unknown type: leave the node alone
        if kind == source and _admits(schema, schema.inputs, index, target):
            plan.inputs.add(index)
    for index, tensor in enumerate(node.outputs):
        kind = _elem_type(tensor, types)
        if kind is None and tensor.name:
            return None
        if kind == source and _admits(schema, schema.outputs, index, target):
            plan.outputs.add(index)
    if node.op == "Cast" and not plan.outputs and target == FLOAT16:
        return None  # a Cast from float to an integer type reads float32: shape arithmetic stays exact
    return plan if plan.inputs or plan.outputs else None


def _is_fp16_boundary(node: gs.Node, types: ValueTypes) -> bool:
    """A Cast to or from float16 is a precision boundary someone chose (or an earlier run inserted)."""
    return node.op == "Cast" and FLOAT16 in (_elem_type(t, types) for t in (*node.inputs, *node.outputs))


def _blocked(node: gs.Node, options: Float16.Options) -> bool:
    if not is_default_domain(node) or node.op in options.block_ops:
        return True
    if any(isinstance(value, gs.Graph) for value in node.attrs.values()):
        return True
    if any(key in node.attrs for key in _FIXED_TYPE_ATTRIBUTES):
        return True
    if node.op == "Constant" and not isinstance(node.attrs.get("value"), gs.Constant):
        return True  # sparse_value and integer/string forms: nothing float16 to write
    return any(re.search(pattern, node.name) for pattern in options.block_nodes)


def _schema(node: gs.Node, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None


def _other(kind: int) -> int:
    return FLOAT if kind == FLOAT16 else FLOAT16


def _admits(schema: onnx.defs.OpSchema, formals, index: int, kind: int) -> bool:
    """Whether the formal parameter behind slot `index` (the last one repeats if variadic) allows `kind`."""
    if not formals:
        return False
    formal = formals[min(index, len(formals) - 1)]
    if index >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return False
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    wanted = "tensor(float16)" if kind == FLOAT16 else "tensor(float)"
    return wanted in allowed.get(formal.type_str, [formal.type_str])


def _elem_type(tensor: gs.Tensor, types: ValueTypes) -> int | None:
    if not tensor.name:
        return 0
    if isinstance(tensor, gs.Constant):  # its dtype, without loading lazy values
        kind = tensor.dtype
        return kind if isinstance(kind, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(kind))
    entry = types.get(tensor.name)
    return None if entry is None else entry[0]


# --------------------------------------------------------------------------- rewriting
class _Rewriter:
    """Applies the plans: retypes outputs and attributes, converts constants, inserts boundary Casts. `source`
    is the float type that becomes `target`; every other value keeps its type."""

    def __init__(self, model: Model, types: ValueTypes, plans: dict[int, _Plan], ctx: PassContext, target: int):
        self.model, self.graph, self.types, self.plans, self.ctx = model, model.graph, types, plans, ctx
        self.target, self.source = target, _other(target)
        self.home: dict[int, int] = {}  # id(variable) -> its element type after the rewrite
        self.casts: dict[tuple[int, int], gs.Variable] = {}
        self.converted: dict[int, gs.Constant] = {}
        self.clipped = self.cast_count = 0

    def apply(self, keep_io_types: bool) -> None:
        for node in self.graph.nodes:
            plan = self.plans.get(id(node))
            if plan is not None:
                self._retype_node(node, plan)
        if not keep_io_types:
            self._retype_inputs()
        self._fix_outputs(self.source if keep_io_types else self.target)
        for node in list(self.model.nodes()):
            self._rewire_inputs(node)
        toposort_graph(self.graph)  # the new Casts were appended

    def stats(self) -> dict[str, int]:
        converted = [node for node in self.graph.nodes if id(node) in self.plans]
        kept = [node for node in self.graph.nodes if id(node) not in self.plans and node.op != "Cast"
                and any(self._is_float(t) for t in (*node.inputs, *node.outputs))]
        stats = {"nodes_converted": len(converted), f"nodes_kept_{_suffix(self.source)}": len(kept),
                 "casts_inserted": self.cast_count, "initializers_converted": len(self.converted)}
        if self.target == FLOAT16:
            stats["constants_clipped"] = self.clipped
        return stats

    def _is_float(self, tensor: gs.Tensor) -> bool:
        return _elem_type(tensor, self.types) in (FLOAT, FLOAT16)

    def _retype_node(self, node: gs.Node, plan: _Plan) -> None:
        for index in plan.outputs:
            tensor = node.outputs[index]
            tensor.dtype = _np_type(self.target)
            self.home[id(tensor)] = self.target
        if node.op == "Cast" and plan.outputs:
            node.attrs["to"] = self.target
        elif node.op == "Constant" and plan.outputs:
            node.attrs["value"] = self._converted_constant(node.attrs["value"])
        elif node.op == "ConstantOfShape" and plan.outputs:
            fill = node.attrs.get("value")
            node.attrs["value"] = self._converted_constant(fill) if isinstance(fill, gs.Constant) else \
                gs.Constant(self.model.unique_name(f"{node.name}_value"), np.zeros(1, _np_type(self.target)))

    def _retype_inputs(self) -> None:
        for tensor in self.graph.inputs:
            if _elem_type(tensor, self.types) == self.source:
                tensor.dtype = _np_type(self.target)
                self.home[id(tensor)] = self.target

    def _rewire_inputs(self, node: gs.Node) -> None:
        plan = self.plans.get(id(node))
        for index, tensor in enumerate(node.inputs):
            if _elem_type(tensor, self.types) != self.source:
                continue
            wanted = self.target if plan is not None and index in plan.inputs else self.source
            if isinstance(tensor, gs.Constant):
                if wanted == self.target:
                    node.inputs[index] = self._converted_constant(tensor)
            elif self.home.get(id(tensor), self.source) != wanted:
                node.inputs[index] = self._cast(tensor, wanted)

    def _fix_outputs(self, wanted: int) -> None:
        """Graph outputs keep their names: a value of the wrong type moves to a new name and is Cast into
        the old one; readers then find the moved value as the output's cast to its old type."""
        for tensor in list(self.graph.outputs):
            if isinstance(tensor, gs.Constant) or _elem_type(tensor, self.types) != self.source:
                continue
            home = self.home.get(id(tensor), self.source)
            if home == wanted or not tensor.inputs:
                continue
            producer = tensor.inputs[0]
            moved = gs.Variable(self.model.unique_name(f"{tensor.name}_{_suffix(home)}"), dtype=tensor.dtype,
                                shape=tensor.shape)
            producer.outputs[producer.outputs.index(tensor)] = moved
            self.home[id(moved)] = home
            self._add_cast(moved, tensor, wanted)
            self.casts[(id(tensor), home)] = moved

    def _cast(self, tensor: gs.Variable, to: int) -> gs.Variable:
        key = (id(tensor), to)
        if key not in self.casts:
            out = gs.Variable(self.model.unique_name(f"{tensor.name}_{_suffix(to)}"), shape=tensor.shape)
            self.casts[key] = self._add_cast(tensor, out, to)
        return self.casts[key]

    def _add_cast(self, source: gs.Variable, out: gs.Variable, to: int) -> gs.Variable:
        out.dtype = _np_type(to)
        name = self.model.unique_name(f"{out.name}_cast")
        self.graph.nodes.append(gs.Node("Cast", name=name, attrs={"to": to}, inputs=[source], outputs=[out]))
        self.home[id(out)] = to
        self.cast_count += 1
        return out

    def _converted_constant(self, constant: gs.Constant) -> gs.Constant:
        if id(constant) not in self.converted:
            values = np.asarray(constant.values)
            values = self._to_half(constant.name, values) if self.target == FLOAT16 else values.astype(np.float32)
            self.converted[id(constant)] = gs.Constant(
                self.model.unique_name(f"{constant.name}_{_suffix(self.target)}"), values)
        return self.converted[id(constant)]

    def _to_half(self, name: str, values: np.ndarray) -> np.ndarray:
        finite = np.isfinite(values)
        overflow = finite & (np.abs(values) > FP16_MAX)
        if overflow.any():
            self.clipped += 1
            self.ctx.logger.warning("fp16: constant %r has %d finite values beyond ±%g; clipped to ±%g",
                                    name, int(overflow.sum()), FP16_MAX, FP16_MAX)
            values = np.where(overflow, np.clip(values, -FP16_MAX, FP16_MAX), values)
        return values.astype(np.float16)


def _suffix(kind: int) -> str:
    return "fp16" if kind == FLOAT16 else "fp32"


def _np_type(kind: int) -> type:
    return np.float16 if kind == FLOAT16 else np.float32
