"""Where Q/DQ pairs go, per deployment profile. The rules implemented:

trt (TensorRT explicit quantization, following NVIDIA's Q/DQ placement guidance):
  1. Conv, ConvTranspose, Gemm and MatMul get Q/DQ on their activation inputs and a DequantizeLinear
     on their int8 weights (per output channel), so TensorRT selects INT8 kernels for them.
  2. Their outputs are not quantized: TensorRT fuses the following bias/activation and decides the
     output precision itself.
  3. On a residual Add fed by a quantized layer's output, the other input (the skip branch) gets
     Q/DQ, so TensorRT can fuse the add into that layer as an INT8 epilogue. Not on an Add that a Softmax
     reads (attention scores plus a mask or a position bias): that is no skip branch, and a padding mask
     holds -inf or float32's lowest value, which no INT8 scale carries (calibration stopped on the -inf of
     nn.MultiheadAttention's key_padding_mask).
  4. A Concat whose output is quantized gets Q/DQ on every input, all with the output's scale, so
     the concat runs in INT8 without requantization (what TensorRT's Q propagation would do).
  5. Activations are INT8 symmetric (zero point 0), per tensor; nothing is quantized inside or across
     If/Loop bodies (only main-graph consumers are rewired).
ort-cpu (ONNX Runtime CPU; its QDQ transformers fuse DQ -> op -> Q into QLinearConv, QGemm,
QLinearMatMul, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, QLinearSigmoid ...):
  1. Inputs of Conv, ConvTranspose, Gemm, MatMul, and inputs and outputs of Add, Mul, Concat, pooling,
     Sigmoid, LeakyRelu and Softmax, where every activation input is quantized already (no float
     islands made), so SiLU (x * Sigmoid(x)) and squeeze-excitation gates run on integers. A ReduceMean
     over the spatial axes (torch's dynamo export of adaptive_avg_pool2d) counts as the GlobalAveragePool
     it computes, and insert-qdq rewrites it into one (`global_means`). An Add read by a LayerNormalization
     (a transformer's residual stream) stays float: the norm runs in float anyway, and a quantized stream
     would carry every block's rounding at a scale its largest channel sets. Activations ONNX Runtime
     runs only in float (FLOAT_ACTIVATIONS) get a Q on their output where an integer-capable op reads it;
     insert-qdq spells HardSwish and HardSigmoid with Mul, Add and Clip where their input is quantized
     (passes/quant/hard_activations.py), so MobileNetV3 runs on integers throughout.
  2. The output of every quantized layer and Add/Mul/pool, after a directly following Relu/Clip
     (ORT folds that activation into the Q's range and drops it), so the chain closes and fusion
     happens; a residual `Add -> Relu` is quantized once, after the Relu.
  3. MaxPool's input and output share a scale (it then runs on integers).
  4. A float constant read by such an Add, Mul or Concat (a MatMul's bias, a scale, a class token) is
     stored quantized with its own range, as ONNX Runtime's QLinearAdd/QLinearMul/QLinearConcat need
     every input dequantized; left float, the op stays a float island between two requantizations.
  5. Activations u8 asymmetric by default (u8 x s8 is what x86 integer kernels run; s8 activations
     leave layers in float there), weights s8 symmetric per output channel.
  6. The outputs of data movement (Reshape, Transpose, Split, Slice, Gather, Resize, ...) applied to a
     quantized tensor, with its scale: ONNX Runtime moves the integers, and a Concat or Add further on
     finds its inputs quantized (YOLO's C2f: Split -> Concat).
  7. A quantized MatMul whose only reader adds a constant bias along the last axis (nn.Linear on tokens) is
     one layer: the Add's output is quantized, the MatMul's is not, and insert-qdq writes the pair as a
     Gemm (flattened to 2-D between Reshapes), which ONNX Runtime runs as a QGemm with the bias in its
     int32 accumulator (passes/quant/bias_gemm.py). A Relu/Clip right after the Add goes inside, between the
     Gemm and its Q (rule 2). Where the Add feeds a LayerNormalization, its output stays float (rule 1) and
     the QGemm returns float.
  8. A MatMul or Gemm whose output a Softmax alone reads (attention scores; through one Add, Sub, Mul or Where:
     a mask or a scale) gets no Q on that output: ONNX Runtime runs it as MatMulIntegerToFloat (QGemm with a
     float output) and the Softmax in float. On ViT-B-sized attention ([1, 12, 197, 64], 1 thread) that took
     1.21 ms against 1.96 for QLinearMatMul + QLinearSoftmax (whose table-driven kernel ran 0.96 ms against
     0.33 for DQ + Softmax + Q), and the exponential no longer reads scores rounded to 8 bits (output SQNR
     24.3 against 16.9 dB on that block). The probabilities are quantized as the next MatMul's input.
  9. A quantized tensor that no integer kernel reads loses its Q/DQ, except a quantized Conv's output (its Q is
     what runs the Conv on integers: ONNX Runtime has no integer Conv with a float output). Applied until nothing
     changes, from the outputs back: the ops between the last layers and the model's outputs run in float, and a
     MatMul or Gemm that only float ops read returns float itself (MatMulIntegerToFloat, QGemm without an output
     scale). Rules 1-6 quantize every op between quantized values; at a model's end that rounded to 8 bits what
     only float ops read, for no time saved: a YOLOv8 export's box decode (anchor Add, stride Mul on [1, 2, 8400])
     ran as QLinearAdd / QLinearMul, rounding box centres to a step its largest anchor sets (80 cells at 640:
     0.31 cells, 10 px at stride 32), and a transformer's residual branch was rounded just before its float Add.
     An op counts as reading integers only when every activation it reads is quantized: GELU spelled
     Mul(x, 0.5·(1 + erf(x/√2))), as torch.export writes it, reads x and a float value, so x's Q/DQ goes and the
     first MLP layer returns float to the (fused) GELU, as with torch's legacy spelling. Of the activations ONNX
     Runtime runs only in float, only HardSwish and HardSigmoid read integers (insert-qdq spells them with integer
     ops); a Tanh, Elu, Softplus or Gelu op reads the layer before in float.
  10. A quantized Conv whose output (or its fused Relu/Clip's) leaves the model gets a Q/DQ on that output, the DQ
     writing the graph output under its name; where a Relu reads a Conv output that leaves the model, the Q goes
     on the Conv output. ONNX Runtime has no integer Conv with a float output: left float, such a head (a
     segmentation map, an auxiliary output) ran as a float Conv behind a Q/DQ of its input and a DQ of its weights
     on every run. A U-Net-like net at 128x128 (1 thread): 2.87 -> 2.46 ms, where quantize_static's model takes
     2.78 and float 2.67; output SQNR 50.2 -> 46.5 dB (quantize_static's 44.2), the output now rounded to 8 bits
     as quantize_static rounds it. `exclude` or `keep-last` keeps such a Conv float, weights included.
  A quantized tensor is read dequantized by all its main-graph consumers, but Shape and Size, which read the
  QuantizeLinear output (same dims; from the DQ they kept a float copy of the tensor made only for its dims:
  torch's legacy exports with dynamic axes); a graph output that nothing reads stays float.
Both profiles: a quantized tensor made from another quantized tensor by data-movement ops alone
(SHARED_SCALE_OPS: Reshape, Transpose, Slice, MaxPool, ...) shares its scale. The values are the same (or a subset),
so minmax ranges agree anyway, but histogram ranges are estimated from subsamples that differ between the
two layouts; with two scales ONNX Runtime keeps a DQ -> op -> Q requantization around the op instead of
moving integers (ViT, percentile: 48 extra Q/DQ pairs around the attention reshapes and transposes).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.rewrite import SHAPE_READERS
from irtool.ir.topo import topo_order
from irtool.passes.quant.bias_gemm import bias_add


class Profile(enum.Enum):
    ORT_CPU = "ort-cpu"
    TRT = "trt"


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ORT_IO_OPS = ("Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
# One-input ops ONNX Runtime runs as QLinearSigmoid, QLinearLeakyRelu, QLinearSoftmax (table lookups on u8)
# when they sit between a DQ and a Q. Left float, SiLU (x * Sigmoid(x): EfficientNet, YOLO) keeps its Mul
# float too, and the INT8 model ran slower than the float one.
ORT_UNARY_OPS = ("Sigmoid", "LeakyRelu", "Softmax")
# Activations ONNX Runtime runs only in float. Their output is quantized where an op with an integer kernel reads it
# (MobileNetV3's HardSwish -> squeeze-excitation pool and Mul, its HardSigmoid gate, Mish's Tanh -> Mul): the op
# stays a float island, but what follows runs on integers, as in quantize_static's model.
FLOAT_ACTIVATIONS = ("HardSwish", "HardSigmoid", "Tanh", "Elu", "Selu", "Softplus", "Gelu", "FastGelu")
# Of those, the ones insert-qdq spells with integer ops where their input is quantized (hard_activations.py): they
# read integers. The others run in float, so a Q/DQ on their input (a QGemm's u8 output dequantized again before a
# Tanh or a fused Gelu) only rounds it: the layer before returns float instead (rule 9).
DECOMPOSED_ACTIVATIONS = ("HardSwish", "HardSigmoid")
FUSED_ACTIVATIONS = ("Relu", "Clip")
CONSTANT_OPERAND_OPS = ("Add", "Mul", "Concat")
# Resize: nearest and linear stay within their input's range (cubic overshoots a little, and saturates).
SHARED_SCALE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Split",
                    "Expand", "Tile", "MaxPool", "DepthToSpace", "SpaceToDepth", "Resize")
# The data movement that keeps every value exactly once (no subset, no copies): an output made by these holds
# its input's values rearranged, so `calibrate` gives it its input's statistics.
PERMUTATION_OPS = frozenset({"DepthToSpace", "Flatten", "Identity", "Reshape", "SpaceToDepth", "Squeeze", "Transpose",
                             "Unsqueeze"})
# Data movement that picks some of its input's values by position, not by size (MaxPool picks by size): a quantized
# output of these shares its input's scale, the union of both ranges, so `calibrate` gives it the input's statistics
# when the input is observed as well (the union is then the input's range for minmax, and one estimate for the rest).
SELECTION_OPS = frozenset({"Gather", "Slice", "Split"})


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                           "MatMulInteger", "QGemm", "QAttention"})


def refuse_quantized(model: Model, what: str, advice: str = "quantize the float model instead") -> None:
    """An InputError when the model already holds quantization nodes: static quantization plans from float
    layers, and on a Q/DQ model it found nothing to observe (ONNX Runtime then returned every output for none
    asked, and calibrate stopped on a zip of mismatched lengths). prune finds no constant weights there."""
    ops = [n.op for n in model.graph.nodes if n.op in QUANTIZED_OPS or n.op.startswith("QLinear")]
    if ops:
        kinds = ", ".join(sorted(set(ops)))
        raise InputError(f"{what}: the model is already quantized ({len(ops)} {kinds} node(s)); {advice}")


def moved_from(tensor: gs.Tensor, ops) -> gs.Variable | None:
    """The data input of the node making `tensor`, when that node's op is one of `ops` (data movement)."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ops or not tensor.inputs[0].inputs:
        return None
    source = tensor.inputs[0].inputs[0]
    return source if isinstance(source, gs.Variable) and source.name else None


@dataclass
class WeightSlot:
    node: gs.Node
    index: int
    axis: int | None  # per-channel axis, None = per tensor


@dataclass
class QuantPlan:
    """Activation tensors to quantize (with the consumer slots to rewire) and weights to quantize."""

    slots: dict[str, list[tuple[gs.Node, int]]] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    share: list[set[str]] = field(default_factory=list)
    weights: list[WeightSlot] = field(default_factory=list)
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)  # float constants stored quantized
    quantized_nodes: list[str] = field(default_factory=list)
    # (MatMul, Add, the Relu/Clip after it or None): one Gemm (bias_gemm)
    bias_adds: list[tuple[gs.Node, gs.Node, gs.Node | None]] = field(default_factory=list)
    # Graph outputs quantized in place: their DequantizeLinear writes the graph output (ort-cpu rule 10)
    outputs: set[str] = field(default_factory=set)

    def add(self, tensor: gs.Tensor, consumer: gs.Node | None = None, index: int | None = None,
            graph_output: bool = False) -> None:
        """Quantize `tensor` for one consumer slot, or for every main-graph consumer when none is given; with
        `graph_output`, also where it leaves the model (apply_plan renames what its producer writes)."""
        if not _is_float_activation(tensor) or (consumer is None and not tensor.outputs and not graph_output):
            return  # a graph output nothing reads stays float: no Q/DQ pair would be inserted for it
        if graph_output:
            self.outputs.add(tensor.name)
        self.tensors[tensor.name] = tensor
        slots = self.slots.setdefault(tensor.name, [])
        pairs = [(consumer, index)] if consumer is not None else [
            (c, i) for c in tensor.outputs for i, t in enumerate(c.inputs) if t is tensor]
        for pair in pairs:
            if all(pair[0] is not s[0] or pair[1] != s[1] for s in slots):
                slots.append(pair)


def _is_float32(tensor: gs.Constant) -> bool:
    return np.asarray(tensor.values).dtype == np.float32 and np.asarray(tensor.values).size > 0


def _is_float_activation(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant) or not tensor.name:
        return False
    return tensor.dtype is None or np.dtype(tensor.dtype) == np.float32


@dataclass(frozen=True)
class Selection:
    """Which compute nodes are quantized (exclusions and mixed precision applied)."""

    exclude: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    keep_fp: frozenset[str] = frozenset()
    only: frozenset[str] | None = None  # sensitivity analysis: quantize just these
    # Convs that convtranspose-to-conv rewrote: exclude-ops=ConvTranspose still names them.
    convtransposes: frozenset[str] = frozenset()

    def enabled(self, model: Model) -> list[gs.Node]:
        nodes = [model.graph.nodes[i] for i in topo_order(model.graph.nodes)]
        compute = [n for n in nodes if n.op in COMPUTE_OPS and _has_weight_or_two_activations(n)]
        first_last = set()
        if compute and self.keep_first:
            first_last.add(compute[0].name)
        if compute and self.keep_last:
            first_last.add(compute[-1].name)
        return [n for n in compute if self._allowed(n) and n.name not in first_last]

    def _allowed(self, node: gs.Node) -> bool:
        if self.only is not None:
            return node.name in self.only
        op = "ConvTranspose" if node.name in self.convtransposes else node.op
        return op not in self.exclude_ops and node.name not in self.keep_fp \
            and not any(re.search(p, node.name) for p in self.exclude)


def _has_weight_or_two_activations(node: gs.Node) -> bool:
    return len(node.inputs) >= 2 and (isinstance(node.inputs[1], gs.Constant) or node.op == "MatMul")


def weight_axis(node: gs.Node, per_channel: bool) -> int | None:
    """Output-channel axis of the weight: Conv [O,I,k], ConvTranspose [I,O/g,k], Gemm B per transB, MatMul [K,N]."""
    if not per_channel:
        return None
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1 if np.asarray(node.inputs[1].values).ndim == 2 else None


def plan_trt(model: Model, selection: Selection, per_channel: bool = True) -> QuantPlan:
    plan = QuantPlan()
    enabled = selection.enabled(model)
    _compute_inputs(plan, enabled, per_channel, all_consumers=False)
    enabled_names = {n.name for n in enabled}
    for node in model.graph.nodes:
        if node.op == "Add" and len(node.inputs) == 2:
            _residual(plan, node, enabled_names)
    for node in model.graph.nodes:
        if node.op == "Concat" and node.outputs[0].name in plan.tensors:
            for i, t in enumerate(node.inputs):
                plan.add(t, node, i)
            plan.share.append({t.name for t in node.inputs if t.name in plan.tensors} | {node.outputs[0].name})
    _share_through_data_movement(plan, model)
    return plan


def _residual(plan: QuantPlan, add: gs.Node, enabled: set[str]) -> None:
    if _feeds_softmax(add.outputs[0]):  # a mask or bias on attention scores (rule 3)
        return
    a, b = add.inputs
    from_layer = [bool(t.inputs) and t.inputs[0].name in enabled for t in (a, b)]
    if not any(from_layer) or isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return
    skip_index = 0 if from_layer[1] and not from_layer[0] else 1
    plan.add(add.inputs[skip_index], add, skip_index)


def plan_ort_cpu(model: Model, selection: Selection, per_channel: bool = True) -> QuantPlan:
    plan = QuantPlan()
    enabled = selection.enabled(model)
    _compute_inputs(plan, enabled, per_channel, all_consumers=True)
    graph_outputs = {t.name for t in model.graph.outputs}
    for node in enabled:
        add = bias_add(node, graph_outputs)
        if add is not None:
            end = _fused_output(add.outputs[0])  # the Add's, or a Relu/Clip's after it (bias_gemm moves it inside)
            if end is not add.outputs[0] and add.outputs[0].name in graph_outputs:
                plan.add(node.outputs[0])  # the sum must stay: MatMul, then Add and activation apart
                continue
            plan.bias_adds.append((node, add, end.inputs[0] if end is not add.outputs[0] else None))
            if not _feeds_layer_norm(end.inputs[0]):  # the residual stream stays float (rule 1)
                plan.add(end)
        elif not _feeds_softmax(node.outputs[0]):  # attention scores stay float (rule 8)
            end = _fused_output(node.outputs[0])
            if node.op == "Conv" and node.outputs[0].name in graph_outputs:
                end = node.outputs[0]  # a Relu reads what leaves the model: the Q goes before it (rule 10)
            plan.add(end, graph_output=node.op == "Conv" and end.name in graph_outputs)
    if selection.only is None:
        means = global_means(model)

        def integer_op(node: gs.Node) -> bool:  # ONNX Runtime has a QLinear kernel for it between a DQ and a Q
            return node.op in ORT_IO_OPS or node.op in ORT_UNARY_OPS or node.name in means

        for node in (model.graph.nodes[i] for i in topo_order(model.graph.nodes)):
            if node.op == "Add" and _feeds_layer_norm(node):
                continue
            if integer_op(node) and _io_quantizable(node, plan):
                _quantize_io(plan, node)
            elif node.op in FLOAT_ACTIVATIONS and _io_quantizable(node, plan) and any(
                    integer_op(c) for c in node.outputs[0].outputs):
                plan.add(node.outputs[0])
            elif node.op in SHARED_SCALE_OPS and node.inputs and node.inputs[0].name in plan.tensors:
                # Same scale as the input: ONNX Runtime drops the DQ -> op -> Q and moves integers, so a
                # Concat or Add further on still finds every input quantized (YOLO's C2f: Split -> Concat).
                for out in node.outputs:
                    if out.outputs:
                        plan.add(out)
        _drop_unread_requantization(plan, integer_op)
    _share_through_data_movement(plan, model)
    return plan


def _drop_unread_requantization(plan: QuantPlan, integer_op) -> None:
    """Rule 9 (module docstring): Q/DQ only where an integer kernel reads the tensor, or a Conv writes it."""
    def reads_integers(node: gs.Node) -> bool:
        if node.name in quantized:
            return True
        if integer_op(node) or node.op in DECOMPOSED_ACTIVATIONS:
            # and only with every activation input quantized: GELU's Mul(x, 0.5·(1 + erf)) in torch.export's
            # spelling reads x and a float value; it runs in float, so x's Q was only an extra rounding
            return _fused_output(node.outputs[0]).name in plan.tensors and all(
                t.name in plan.tensors for t in node.inputs if t.name and not isinstance(t, gs.Constant))
        return node.op in SHARED_SCALE_OPS and any(t.name in plan.tensors for t in node.outputs)

    quantized = set(plan.quantized_nodes)
    while unread := [name for name, t in plan.tensors.items()
                     if not _conv_output(t, quantized) and not any(reads_integers(c) for c in t.outputs)]:
        for name in unread:
            del plan.tensors[name], plan.slots[name]
    plan.constants = [(node, i) for node, i in plan.constants if _fused_output(node.outputs[0]).name in plan.tensors]


def _conv_output(tensor: gs.Tensor, quantized: set[str]) -> bool:
    """Made by a quantized Conv, or by the Relu/Clip right after one (fused into its output). Not ConvTranspose:
    ONNX Runtime's CPU provider runs it in float, so its output's Q is a requantization like any other."""
    if len(tensor.inputs) == 1 and tensor.inputs[0].op in FUSED_ACTIVATIONS and tensor.inputs[0].inputs:
        tensor = tensor.inputs[0].inputs[0]
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "Conv" and tensor.inputs[0].name in quantized


def global_means(model: Model) -> set[str]:
    """Names of the ReduceMean nodes over every axis after the channel one, dims kept: a GlobalAveragePool as
    torch's dynamo exporter writes adaptive_avg_pool2d(x, 1) (squeeze-excitation gates, classifier heads).
    insert-qdq turns them into GlobalAveragePool for ort-cpu, which has QLinearGlobalAveragePool and no
    integer ReduceMean. Ranks come from the IR, or from shape inference when an input's shape is unknown."""
    means = [n for n in model.graph.nodes if n.op == "ReduceMean" and n.inputs and int(n.attrs.get("keepdims", 1))
             and not {0, 1} & set(_axes(n) or [0])]  # a LayerNorm's mean over channels needs no shape inference
    ranks = {n.name: len(n.inputs[0].shape) for n in means if n.inputs[0].shape is not None}
    if len(ranks) < len(means):
        from irtool.ir.skeleton import infer_types

        from_proto = infer_types(model.shape_inference_proto())
        for node in means:
            dims = from_proto.get(node.inputs[0].name, (None, None))[1]
            if node.name not in ranks and dims is not None:
                ranks[node.name] = len(dims)
    return {n.name for n in means if n.name in ranks and _spatial_axes(n, ranks[n.name])}


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).ravel()]
    return None  # every axis, or computed ones


def _spatial_axes(node: gs.Node, rank: int) -> bool:
    axes = _axes(node)
    return axes is not None and rank >= 3 and sorted(a % rank for a in axes) == list(range(2, rank))


def _quantize_io(plan: QuantPlan, node: gs.Node) -> None:
    for i, t in enumerate(node.inputs):
        plan.add(t)
        if node.op in CONSTANT_OPERAND_OPS and isinstance(t, gs.Constant) and _is_float32(t):
            plan.constants.append((node, i))
    plan.add(_fused_output(node.outputs[0]))


def _share_through_data_movement(plan: QuantPlan, model: Model) -> None:
    """A quantized tensor made from another by data-movement ops alone (Add -> Reshape -> Transpose -> MatMul:
    the Add's output and the MatMul's input) shares its scale."""
    for name, tensor in list(plan.tensors.items()):
        source = tensor
        while (source := moved_from(source, SHARED_SCALE_OPS)) is not None:
            if source.name in plan.tensors:
                plan.share.append({source.name, name})
                break


def _feeds_layer_norm(add: gs.Node) -> bool:
    """An Add read by a LayerNormalization (or a decomposed one's mean over the last axis): a transformer's
    residual stream. ONNX Runtime runs the norm in float either way (fusing a float Add into it as
    SkipLayerNormalization), and quantized, the stream would carry every block's rounding to the end."""
    for consumer in add.outputs[0].outputs:
        if consumer.op in ("LayerNormalization", "SkipLayerNormalization"):
            return True
        if consumer.op == "ReduceMean" and _axes(consumer) == [-1]:
            return True
    return False


def _io_quantizable(node: gs.Node, plan: QuantPlan) -> bool:
    """Quantize around an op only where it sits between quantized values (no float islands made)."""
    activations = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    return bool(activations) and all(t.name in plan.tensors for t in activations)


def _feeds_softmax(tensor: gs.Tensor) -> bool:
    """Read by a Softmax alone, directly or through one Add, Sub, Mul or Where (an attention mask or scale)."""
    readers = [c for c in tensor.outputs if c.op not in SHAPE_READERS]
    if len(readers) != 1:
        return False
    if readers[0].op == "Softmax":
        return True
    after = readers[0].outputs[0].outputs if readers[0].op in ("Add", "Sub", "Mul", "Where") else []
    return len(after) == 1 and after[0].op == "Softmax"


def _fused_output(tensor: gs.Tensor) -> gs.Tensor:
    if len(tensor.outputs) == 1 and tensor.outputs[0].op in FUSED_ACTIVATIONS:
        return tensor.outputs[0].outputs[0]
    return tensor


def _compute_inputs(plan: QuantPlan, nodes: list[gs.Node], per_channel: bool, all_consumers: bool) -> None:
    for node in nodes:
        plan.quantized_nodes.append(node.name)
        activation_slots = [0] if isinstance(node.inputs[1], gs.Constant) else [0, 1]
        for i in activation_slots:
            if all_consumers:
                plan.add(node.inputs[i])
            else:
                plan.add(node.inputs[i], node, i)
        if isinstance(node.inputs[1], gs.Constant):
            plan.weights.append(WeightSlot(node, 1, weight_axis(node, per_channel)))


PLANNERS = {Profile.TRT: plan_trt, Profile.ORT_CPU: plan_ort_cpu}


def candidate_tensors(model: Model, profile: Profile | None = None) -> list[str]:
    """What `calibrate` observes: every tensor the profile may quantize, or any profile when it is None."""
    everything = Selection()
    planners = PLANNERS.values() if profile is None else [PLANNERS[profile]]
    return sorted({name for plan in planners for name in plan(model, everything).tensors})
