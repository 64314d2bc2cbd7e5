"""Pass `insert-qdq`: QuantizeLinear/DequantizeLinear pairs from calibrated ranges, per profile.

Placement rules are in passes/quant/placement.py. Scales and zero points:
  activations, symmetric int8 (trt, or ort-cpu with activations=s8):
      T = max(|low|, |high|),  s = T / 127,  z = 0
  activations, asymmetric uint8 (ort-cpu default):
      low' = min(low, 0), high' = max(high, 0),  s = (high' − low') / 255,  z = round(−low' / s)
  weights, symmetric int8 per output channel c (per tensor with per-channel=false):
      s_c = max|W_c| / M,  q = clip(round(W / s_c), −M, M),  W ≈ s_c · q,
      M = 127, or 64 with reduce-range (ort-cpu's default; see below)
  biases of quantized Conv/Gemm (ort-cpu): int32, scale s_x · s_c, zero point 0 (TensorRT keeps float bias)
Why reduce-range is on by default for ort-cpu: x86 CPUs without VNNI (AVX2, AVX-512F; e.g. AMD Zen 2/3)
run ONNX Runtime's u8 x s8 kernels with an instruction (vpmaddubsw) that adds two u8·s8 products in int16
and saturates. With 8-bit weights 2·255·127 > 32767, so the integer model diverges from its own Q/DQ
definition: the digits CNNs of tests/quant measured 18-20 dB output SQNR in ONNX Runtime against 40-46 dB
for the same Q/DQ graph run unfused. With weights in [-64, 64] (2·255·64 = 32640 <= 32767) the two agree.
ARM and VNNI CPUs do not saturate; for them `reduce-range=false` buys back about 4 dB of weight noise.
TensorRT does not saturate either: the trt profile always uses M = 127.
Tensors that must share a scale (concat inputs for trt; tensors joined by data-movement ops alone,
placement.SHARED_SCALE_OPS) use the union of their ranges; groups that overlap merge first. Mixed
precision (min-sqnr / keep-fp) keeps the layers to which the output is most sensitive in float
(passes/quant/sensitivity.py). A ConvTranspose that convtranspose-to-conv rewrote and that stays float
(excluded by name, by exclude-ops=ConvTranspose, first/last, or by mixed precision) is turned back into the
ConvTranspose: the rewrite only pays as an integer Conv (in float: 1.5x the latency on the bench's pose net).
GELU (ort-cpu, fuse-gelu=true): ONNX Runtime cannot fuse a GELU between Q/DQ nodes (it gives each reader of x
its own DQ copy first), so the profile emits the fused op itself (irtool.ir.gelu; com.microsoft.Gelu / FastGelu
below opset 20, for the erf and tanh forms), before it plans: the GELU is then one float activation that reads the
layer before in float and is quantized for the next (none of its inner ops, such as gelu_new's x·x, is planned).
The trt profile leaves the ops: TensorRT fuses pointwise chains itself and has no com.microsoft ops.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from irtool.errors import InputError
from irtool.ir.gelu import fuse_gelu
from irtool.ir.model import Model
from irtool.ir.rewrite import SHAPE_READERS, values_digest
from irtool.ir.topo import toposort_graph
from irtool.passes import deconv
from irtool.passes.fp16 import has_float16_source
from irtool.passes.quant.bias_gemm import bias_add
from irtool.passes.quant.bias_gemm import fuse as fuse_bias_adds
from irtool.passes.quant.calibrate import METADATA_KEY, stored_profile, stored_ranges
from irtool.passes.quant.hard_activations import decompose as decompose_hard_activations
from irtool.passes.quant.placement import (
    PLANNERS,
    Profile,
    QuantPlan,
    Selection,
    WeightSlot,
    global_means,
    refuse_quantized,
)
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

# bias-correct's record of the biases it changed (record_bias_corrections), read and dropped here.
BIAS_CORRECTION_KEY = "irtool.bias_correction"
# The layers bias-correct{mode=empirical} measured with float weights (its own mixed-precision decision, made as
# insert-qdq's), with the min-sqnr and keep-fp it decided by: an insert-qdq given the same keeps those float instead
# of deciding again, so the corrections fit the model it writes; one given others warns that they may not.
KEPT_FLOAT_KEY = "irtool.kept_float"
# gptq's list of the layers whose weights it rounded (their float weights: Model.float_weights), dropped here too.
WEIGHT_ROUNDING_KEY = "irtool.weight_rounding"
# {int8 weight: digest of the float weight gptq rounded it from}, written here and kept in the model: quant-dynamic's
# share-head tells a tied LM head's integers for its table's by it (gptq's rounding is not the nearest one, so the
# values alone do not say so).
ROUNDED_FROM_KEY = "irtool.rounded_from"

log = logging.getLogger(__name__)


class ActivationType(enum.Enum):
    U8 = "u8"
    S8 = "s8"


def activation_qparams(low: float, high: float, signed: bool) -> tuple[np.float32, np.ndarray]:
    if signed:
        bound = max(abs(low), abs(high))
        scale = bound / 127.0 if bound > 0 else 1.0
        return np.float32(scale), np.array(0, dtype=np.int8)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zero = int(np.clip(round(-low / scale), 0, 255))
    return np.float32(scale), np.array(zero, dtype=np.uint8)


FULL_RANGE, REDUCED_RANGE = 127, 64  # 2·255·64 = 32640 still fits int16; ORT's reduce_range uses ±64 too


def quantize_weight(w: np.ndarray, axis: int | None, limit: int = FULL_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-limit, limit]: returns (q, scale) with scale per channel along `axis` (or a scalar)."""
    w = w.astype(np.float32)
    if axis is None:
        bound = np.abs(w).max()
        scale = np.float32(bound / limit if bound > 0 else 1.0)
        return np.clip(np.round(w / scale), -limit, limit).astype(np.int8), np.asarray(scale, np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    bound = np.abs(w).max(axis=other)
    scale = np.where(bound > 0, bound / limit, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -limit, limit).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class Placement:
    profile: Profile
    activations: ActivationType
    per_channel: bool
    reduce_range: bool = False  # weights in [-64, 64]; only ort-cpu honours it

    @property
    def signed(self) -> bool:
        return self.profile is Profile.TRT or self.activations is ActivationType.S8

    @property
    def weight_limit(self) -> int:
        return REDUCED_RANGE if self.reduce_range and self.profile is Profile.ORT_CPU else FULL_RANGE


def build_plan(model: Model, placement: Placement, selection: Selection) -> QuantPlan:
    return PLANNERS[placement.profile](model, selection, placement.per_channel)


def apply_plan(model: Model, plan: QuantPlan, ranges: dict[str, tuple[float, float]], placement: Placement) -> int:
    """Insert the Q/DQ pairs and weight DQs of `plan`; return the number of Q/DQ pairs."""
    fuse_bias_adds(model, plan)
    shared = _shared_ranges(plan, ranges)
    pairs = 0
    for name, tensor in plan.tensors.items():
        if name not in shared:
            log.debug("insert-qdq: no calibrated range for %s, left in float", name)
            continue
        _insert_pair(model, tensor, plan.slots[name], *activation_qparams(*shared[name], placement.signed),
                     shapes_read_integers=placement.profile is Profile.ORT_CPU, graph_output=name in plan.outputs)
        pairs += 1
    stored: dict[str, gs.Variable] = {}
    for node, index in plan.constants:
        _quantize_constant(model, node, index, placement.signed, stored)
    quantized = set()
    for slot in plan.weights:
        scale = _quantize_weight_slot(model, slot, placement.weight_limit)
        if scale is not None:
            quantized.add(slot.node.name)
            if placement.profile is Profile.ORT_CPU:
                _quantize_bias(model, slot.node, scale, slot.axis)
    restore_uncorrected_biases(model, quantized)
    restore_unrounded_weights(model, quantized)
    toposort_graph(model.graph)  # new Q/DQ nodes were appended at the end
    return pairs


def global_means_to_pools(model: Model, means: set[str]) -> int:
    """Rewrite each spatial-mean ReduceMean named in `means` (placement.global_means) that now reads a dequantized
    value as the GlobalAveragePool it computes, so ONNX Runtime runs QLinearGlobalAveragePool; return how many."""
    count = 0
    for node in model.graph.nodes:
        source = node.inputs[0].inputs if node.name in means else []
        if source and source[0].op == "DequantizeLinear":
            node.op, node.attrs = "GlobalAveragePool", {}
            while len(node.inputs) > 1:  # the axes (gs's input lists take no slice deletion)
                node.inputs.pop()
            count += 1
    return count


# The original "bias" of a MatMul that bias-correct gave a bias Add: restoring it removes that Add.
INSERTED_BIAS = "inserted"


def record_bias_corrections(model: Model, originals: dict[str, dict | str | None]) -> None:
    """Note each corrected layer's bias before correction ({"name", "shape", "values"}, None: none, INSERTED_BIAS:
    its bias Add is bias-correct's), for restore_uncorrected_biases; a layer corrected twice keeps its first
    original."""
    record = json.loads(model.metadata.get(BIAS_CORRECTION_KEY, "{}"))
    for name, bias in originals.items():
        record.setdefault(name, bias)
    model.metadata[BIAS_CORRECTION_KEY] = json.dumps(record, sort_keys=True)


def bias_slot(node: gs.Node, graph_outputs: set[str]) -> tuple[gs.Node, int] | None:
    """Where a layer's bias is, as (node, input index): a Conv's or Gemm's input 2 (which may not exist yet), or
    the constant of the bias Add after a MatMul (bias_gemm.bias_add); None for a MatMul without one."""
    if node.op != "MatMul":
        return node, 2
    add = bias_add(node, graph_outputs)
    return None if add is None else (add, next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant)))


def restore_uncorrected_biases(model: Model, quantized: set[str]) -> None:
    """Give every layer that `bias-correct` corrected but whose weight stays float (excluded, or kept float by
    mixed precision) its original bias back: the correction cancels a weight rounding error it does not have."""
    record = json.loads(model.metadata.get(BIAS_CORRECTION_KEY, "{}"))
    outputs = {t.name for t in model.graph.outputs}
    for node in model.graph.nodes:
        slot = bias_slot(node, outputs) if node.name in record and node.name not in quantized else None
        if slot is None or len(slot[0].inputs) <= slot[1]:
            continue
        holder, index = slot
        original = record[node.name]
        if original == INSERTED_BIAS:
            _remove_bias_add(model, node, holder)
        elif original is None:
            holder.inputs.pop()
        else:
            dtype = np.asarray(holder.inputs[index].values).dtype
            values = np.asarray(original["values"], dtype).reshape(original["shape"])
            holder.inputs[index] = gs.Constant(model.unique_name(original["name"]), values)


def restore_unrounded_weights(model: Model, quantized: set[str]) -> None:
    """Give every layer that `gptq` rounded but whose weight stays float its float weight back (from
    Model.float_weights: in memory, so within one pipeline run; see lost_float_weights)."""
    rounded = set(json.loads(model.metadata.get(WEIGHT_ROUNDING_KEY, "[]")))
    for node in model.graph.nodes:
        if node.name in rounded and node.name not in quantized and node.name in model.float_weights \
                and np.shape(model.float_weights[node.name][1]) == np.shape(node.inputs[1].values):
            name, values = model.float_weights[node.name]
            node.inputs[1] = gs.Constant(model.unique_name(name), values)


def record_rounded_origins(model: Model) -> None:
    """Note under ROUNDED_FROM_KEY each int8 weight made from gptq's rounding, with a digest of its float weight."""
    rounded = set(json.loads(model.metadata.get(WEIGHT_ROUNDING_KEY, "[]")))
    record = json.loads(model.metadata.get(ROUNDED_FROM_KEY, "{}"))
    for node in model.graph.nodes:
        if node.name not in rounded or node.name not in model.float_weights or len(node.inputs) < 2:
            continue
        dequantize = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        if dequantize is not None and dequantize.op == "DequantizeLinear" \
                and isinstance(dequantize.inputs[0], gs.Constant):
            record[dequantize.inputs[0].name] = values_digest(model.float_weights[node.name][1])
    if record:
        model.metadata[ROUNDED_FROM_KEY] = json.dumps(record, sort_keys=True)


def lost_float_weights(model: Model) -> list[str]:
    """The layers gptq rounded in an earlier run: their float weights are not in memory, so kept float they keep
    the rounded weights, and SQNR is measured against the rounded model."""
    rounded = json.loads(model.metadata.get(WEIGHT_ROUNDING_KEY, "[]"))
    return [name for name in rounded if name not in model.float_weights]


def restore_float_convtransposes(model: Model, quantized: set[str]) -> list[str]:
    """Turn the ConvTransposes that convtranspose-to-conv rewrote and that stay float back into ConvTransposes:
    the rewrite exists for the integer Conv, and in float its phase Conv can cost more (zero taps). Their
    bias-correct corrections and gptq roundings are undone first (a correction per phase is no ConvTranspose bias)
    and forgotten."""
    names = set(deconv.rewritten(model)) - quantized
    if not names:
        return []
    # their own biases and weights only, and forgotten after: apply_plan restores the other float layers', once
    others = {n.name for n in model.graph.nodes} - names
    restore_uncorrected_biases(model, others)
    restore_unrounded_weights(model, others)
    restored = deconv.restore(model, names)
    if BIAS_CORRECTION_KEY in model.metadata:
        record = json.loads(model.metadata[BIAS_CORRECTION_KEY])
        for name in names:
            record.pop(name, None)
        model.metadata[BIAS_CORRECTION_KEY] = json.dumps(record, sort_keys=True)
    if WEIGHT_ROUNDING_KEY in model.metadata:
        model.metadata[WEIGHT_ROUNDING_KEY] = json.dumps(
            sorted(set(json.loads(model.metadata[WEIGHT_ROUNDING_KEY])) - names))
    return restored


def _remove_bias_add(model: Model, matmul: gs.Node, add: gs.Node) -> None:
    """Undo bias-correct's bias Add: the MatMul writes the Add's output (its old name) again."""
    out = add.outputs[0]
    add.inputs.clear()
    add.outputs.clear()
    matmul.outputs[0] = out
    model.graph.nodes.remove(add)


def _shared_ranges(plan: QuantPlan, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Every tensor's range, where overlapping share groups merge and each merged group gets the union of its
    members' ranges. A member without a range of its own (ranges stored by an older calibrate, or given by
    hand) takes the group's: it holds some of the same values."""
    out = {n: ranges[n] for n in plan.tensors if n in ranges}
    graph = nx.Graph()
    for group in plan.share:
        members = sorted(group)
        graph.add_nodes_from(members)
        graph.add_edges_from(zip(members, members[1:], strict=False))  # a path joins them
    for component in nx.connected_components(graph):
        known = [out[n] for n in component if n in out]
        if known:
            union = (min(r[0] for r in known), max(r[1] for r in known))
            out.update({n: union for n in component if n in plan.tensors})
    return out


def _insert_pair(model: Model, tensor: gs.Tensor, slots: list, scale: np.float32, zero: np.ndarray,
                 shapes_read_integers: bool = False, graph_output: bool = False) -> None:
    """Q and DQ after `tensor`, the DQ read by `slots`. With `shapes_read_integers`, a Shape or Size slot reads
    the Q output instead (same shape): read from the DQ, it kept that DQ in ONNX Runtime's graph, a float copy
    of the tensor made only to read its dims (torch's legacy exports with dynamic axes read many). With
    `graph_output`, the DQ writes `tensor` itself (the model's output keeps its name, and every reader reads the
    dequantized values) and its producer writes a renamed copy that only the Q reads."""
    if not slots and not graph_output:
        return
    base = tensor.name
    scale_c = gs.Constant(model.unique_name(f"{base}_scale"), np.asarray(scale, np.float32))
    zero_c = gs.Constant(model.unique_name(f"{base}_zero_point"), zero)
    quantized = gs.Variable(model.unique_name(f"{base}_quantized"), dtype=zero.dtype)
    dequantized = gs.Variable(model.unique_name(f"{base}_dequantized"), dtype=np.float32)
    if graph_output:  # readers of the output keep reading it, now the DQ's
        producer = tensor.inputs[0]
        raw = gs.Variable(model.unique_name(f"{base}_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = raw
        tensor, dequantized, slots = raw, tensor, []
    q = gs.Node("QuantizeLinear", model.unique_name(f"{base}_QuantizeLinear"),
                inputs=[tensor, scale_c, zero_c], outputs=[quantized])
    dq = gs.Node("DequantizeLinear", model.unique_name(f"{base}_DequantizeLinear"),
                 inputs=[quantized, scale_c, zero_c], outputs=[dequantized])
    for consumer, index in slots:
        shape_only = shapes_read_integers and consumer.op in SHAPE_READERS
        consumer.inputs[index] = quantized if shape_only else dequantized
    model.graph.nodes.extend([q, dq])


def _quantize_weight_slot(model: Model, slot: WeightSlot, limit: int) -> np.ndarray | None:
    """Quantize one weight in place; return its scale (None when the weight is not float32)."""
    weight = slot.node.inputs[slot.index]
    values = np.asarray(weight.values)
    if values.dtype != np.float32:
        return None
    q, scale = quantize_weight(values, slot.axis, limit)
    slot.node.inputs[slot.index] = _dequantized_constant(model, weight.name, q, scale,
                                                         np.zeros(scale.shape, np.int8), slot.axis)
    return scale


def _dequantized_constant(model: Model, base: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                          axis: int | None = None) -> gs.Variable:
    """Stored integers `q` read through a new DequantizeLinear; returns its float output."""
    q_c = gs.Constant(model.unique_name(f"{base}_quantized"), q)
    scale_c = gs.Constant(model.unique_name(f"{base}_scale"), np.asarray(scale, np.float32))
    zero_c = gs.Constant(model.unique_name(f"{base}_zero_point"), zero)
    out = gs.Variable(model.unique_name(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    model.graph.nodes.append(gs.Node("DequantizeLinear", model.unique_name(f"{base}_DequantizeLinear"),
                                     attrs=attrs, inputs=[q_c, scale_c, zero_c], outputs=[out]))
    return out


def _quantize_constant(model: Model, node: gs.Node, index: int, signed: bool, stored: dict) -> None:
    """Store a float constant operand quantized over its own range (once per constant), read through a DQ."""
    constant = node.inputs[index]
    if constant.name not in stored:
        values = np.asarray(constant.values, dtype=np.float32)
        if not np.all(np.isfinite(values)):
            return
        scale, zero = activation_qparams(float(values.min()), float(values.max()), signed)
        info = np.iinfo(zero.dtype)
        q = np.asarray(np.clip(np.round(values / scale) + int(zero), info.min, info.max), dtype=zero.dtype)
        stored[constant.name] = _dequantized_constant(model, constant.name, q, scale, zero)
    node.inputs[index] = stored[constant.name]


def _quantize_bias(model: Model, node: gs.Node, weight_scale: np.ndarray, axis: int | None) -> None:
    """int32 bias with scale s_x · s_w (zero point 0), as ONNX Runtime's integer kernels take it. Without it
    ONNX Runtime leaves a quantized Gemm in float (it quantizes a float Conv bias itself, not a Gemm's)."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    bias = np.asarray(node.inputs[2].values)
    if source is None or source.op != "DequantizeLinear" or bias.dtype != np.float32 or bias.ndim != 1 \
            or weight_scale.size not in (1, bias.size) or (weight_scale.size > 1 and axis is None):
        return
    scale = np.asarray(np.float32(source.inputs[1].values) * weight_scale, dtype=np.float32)
    q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
    node.inputs[2] = _dequantized_constant(model, node.inputs[2].name, q, scale, np.zeros(scale.shape, np.int32),
                                           0 if scale.size > 1 else None)


class InsertQDQ(Pass):
    """Insert INT8 QuantizeLinear/DequantizeLinear for TensorRT or ONNX Runtime CPU."""

    name = "insert-qdq"

    @dataclass(frozen=True)
    class Options:
        profile: Profile = Profile.ORT_CPU
        activations: ActivationType = ActivationType.U8
        per_channel: bool = True
        reduce_range: bool = True
        exclude: tuple[Regex, ...] = ()
        exclude_ops: tuple[str, ...] = ()
        keep_first: bool = False
        keep_last: bool = False
        min_sqnr: float | None = None
        keep_fp: int = 0
        fuse_gelu: bool = True  # ort-cpu only: see the module docstring

        def __post_init__(self):
            if self.keep_fp < 0:
                raise ValueError("keep-fp must be >= 0")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        refuse_quantized(model, "insert-qdq")
        ranges = stored_ranges(model)
        if ranges is None:
            raise InputError("insert-qdq needs calibrated ranges: run `calibrate` before it "
                             "(e.g. --passes calibrate,insert-qdq or the `quant` pipeline)")
        measured_for = stored_profile(model)
        if measured_for not in (None, self.options.profile):
            raise InputError(f"calibrate{{profile={measured_for.value}}} measured only the tensors that profile "
                             f"quantizes; insert-qdq{{profile={self.options.profile.value}}} needs others: "
                             f"calibrate with profile={self.options.profile.value} or without a profile")
        placement = Placement(self.options.profile, self.options.activations, self.options.per_channel,
                              self.options.reduce_range)
        if lost := lost_float_weights(model):
            ctx.logger.warning("insert-qdq: gptq rounded %d layer(s) in an earlier run; any left float keep the "
                               "rounded weights, and SQNR targets are measured against them: run gptq and insert-qdq "
                               "in one pipeline for their float weights", len(lost))
        ort_cpu = self.options.profile is Profile.ORT_CPU
        # GELU fused first: placed as one float activation, none of its inner ops (x·x in gelu_new) is planned
        fused = fuse_gelu(model) if self.options.fuse_gelu and ort_cpu else 0
        selection = self._selection(model, ranges, placement, ctx)
        plan = build_plan(model, placement, selection)
        hard = decompose_hard_activations(model, ranges, set(plan.tensors)) if ort_cpu else 0
        if hard:
            plan = build_plan(model, placement, selection)
        restored = restore_float_convtransposes(model, set(plan.quantized_nodes))
        if restored:
            plan = build_plan(model, placement, selection)
        means = global_means(model) if ort_cpu else set()  # before the Q/DQ: their outputs carry no shapes
        pairs = apply_plan(model, plan, ranges, placement)
        pools = global_means_to_pools(model, means)
        if pairs == 0 and has_float16_source(model):
            ctx.logger.warning("insert-qdq: nothing quantized: the model computes in float16, and INT8 placement "
                               "takes float32; run `fp32` first (the quant pipelines do)")
        record_rounded_origins(model)
        del model.metadata[METADATA_KEY]
        model.metadata.pop(BIAS_CORRECTION_KEY, None)
        model.metadata.pop(KEPT_FLOAT_KEY, None)
        model.metadata.pop(WEIGHT_ROUNDING_KEY, None)
        model.float_weights.clear()
        model.metadata.pop(deconv.METADATA_KEY, None)
        return PassResult(modified=True, stats={
            "qdq_pairs": pairs, "weights_quantized": len(plan.weights), "layers_quantized": len(plan.quantized_nodes),
            "layers_kept_float": sorted(selection.keep_fp), "gelu_fused": fused, "global_pools": pools,
            "hard_activations": hard, "convtransposes_restored": len(restored), "profile": self.options.profile.value})

    def _selection(self, model: Model, ranges, placement: Placement, ctx: PassContext) -> Selection:
        base = Selection(tuple(self.options.exclude), tuple(self.options.exclude_ops), self.options.keep_first,
                         self.options.keep_last, convtransposes=frozenset(deconv.rewritten(model)))
        mine = {"min_sqnr": self.options.min_sqnr, "keep_fp": self.options.keep_fp}
        decided = json.loads(model.metadata.get(KEPT_FLOAT_KEY, "null"))
        if isinstance(decided, list):  # written before the options were recorded (a model saved in between)
            decided = {"layers": decided, **mine}
        if decided is not None and {k: decided[k] for k in mine} == mine:
            kept = frozenset(decided["layers"])
            if not kept:
                return base
            ctx.logger.info("insert-qdq: keeping the %d layer(s) bias-correct measured in float", len(kept))
            return dataclasses.replace(base, keep_fp=kept)
        if decided is not None:
            ctx.logger.warning(
                "insert-qdq: bias-correct{mode=empirical} measured its corrections with %d layer(s) float "
                "(min-sqnr=%s, keep-fp=%s), insert-qdq decides with min-sqnr=%s, keep-fp=%s: where the two differ, "
                "the corrections after those layers may not fit; give both passes the same options (the quant "
                "pipelines do)", len(decided["layers"]), decided["min_sqnr"], decided["keep_fp"],
                self.options.min_sqnr, self.options.keep_fp)
        if self.options.min_sqnr is None and not self.options.keep_fp:
            return base
        from irtool.passes.quant.sensitivity import keep_in_float

        keep = keep_in_float(model, ranges, placement, base, ctx, min_sqnr=self.options.min_sqnr,
                             keep_fp=self.options.keep_fp)
        return dataclasses.replace(base, keep_fp=frozenset(keep))
