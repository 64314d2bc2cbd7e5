"""Pass `convtranspose-to-conv`: a ConvTranspose as a Conv, followed by DepthToSpace when it is strided
(sub-pixel convolution); for 1-D (vocoders' upsamplers) by a Reshape, Transpose, Reshape interleave.

ONNX Runtime's CPU provider has no integer ConvTranspose: in an INT8 model a U-Net's up-convolutions ran in
float between a DequantizeLinear and a QuantizeLinear (in quantize_static's models too). A ConvTranspose of
stride s computes each of the s x s output phases as a correlation of its input with a slice of its kernel, so it
equals one Conv with C_out·s·s filters followed by DepthToSpace(s, CRD) (Shi et al., "Is the deconvolution layer
the same as a convolutional layer?", 2016). Both run on integers in ONNX Runtime (QLinearConv; DepthToSpace moves
the quantized values), so `quant` runs this pass; `quant-trt` does not, as TensorRT has INT8 deconvolutions.

Per spatial axis (kernel k, stride s, leading pad p): output t reads input i through kernel tap a where
t + p = i·s + a. For the output phase r' = t mod s write r' + p = c·s + r; then a = r + m·s and i = t div s + c − m
for m = 0, 1, ... while a < k. Phase r' is a correlation with taps at input offsets d = c − m, so one Conv over the
offsets d_min .. d_max (leading pad −d_min) holds every phase: filter (o, r'_y, r'_x) at (d_y − d_min_y,
d_x − d_min_x) is W[:, o, a_y, a_x]. When every phase has its taps at the same offsets (k a multiple of s and p
one too, as in a U-Net's kernel-2 stride-2 up-convolution) the Conv has the ConvTranspose's MACs; otherwise its
kernel holds zeros, and the pass rewrites only up to `max-macs` times the original MACs (kernel 4, stride 2, pad 1:
2.25x). A Relu, Clip or other elementwise activation that alone reads the ConvTranspose moves before the
DepthToSpace, where ONNX Runtime folds it into the integer Conv (left after it, the Conv's output was quantized
over its negative values too: -1 dB on the test decoder).

An output length that is no multiple of s (kernel 3, stride 2, pads 1 without output_padding: 2·input − 1) is
computed in whole phases and its last positions cut off by a Slice (ONNX Runtime slices the quantized values).
Declines groups: the Conv would be grouped too, and ONNX Runtime's QLinearConv ran a depthwise one with s·s
outputs per channel (FCN's bilinear upsampler, kernel 4 stride 2) 2.6x slower than the float ConvTranspose between
DQ and Q; with 8 channels per group 1.1x (probe, 1 thread). Also declines dilations, auto_pad, an output_shape
attribute, unequal strides, non-constant weights or bias, other than 1-D or 2-D, or a Conv that would need
negative padding.
Each rewrite is recorded in the model's metadata (METADATA_KEY): the ConvTranspose's attributes and names and a
digest of the Conv's weight. `restore` turns a rewrite back into the ConvTranspose, and insert-qdq calls it for the
rewrites it leaves float (`exclude`, `exclude-ops=ConvTranspose`, keep-first/last, mixed precision): in float the
phase Conv only costs (kernel 4, stride 2, pads 1: 2.25x the MACs, 1.5x the float latency on the bench's pose net).
`float_copy` restores them in a copy for calibrate's float pass, which ONNX Runtime runs faster as ConvTransposes.
Contract: bounded (the same products, summed in another order).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.calibration.tap import Phases
from irtool.ir.model import Model
from irtool.ir.rewrite import is_default_domain, is_graph_output, values_digest
from irtool.ir.topo import toposort_graph
from irtool.passmanager import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

# {Conv name: what restore needs} of every rewrite, JSON in the model's metadata.
METADATA_KEY = "irtool.convtranspose_to_conv"

# Elementwise ops of one activation input: they commute with DepthToSpace.
MOVABLE_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
                                 "Selu", "Gelu", "Softplus"})


class ConvTransposeToConv(Pass):
    """Rewrite ConvTranspose as Conv (+ DepthToSpace for strides > 1), so that INT8 runs it on integers."""

    name = "convtranspose-to-conv"

    @dataclass(frozen=True)
    class Options:
        max_macs: float = 2.25  # rewrite only where the Conv has at most this many times the MACs

        def __post_init__(self):
            if self.max_macs < 1.0:
                raise ValueError("max-macs must be >= 1")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rewritten = 0
        for node in [n for n in model.graph.nodes if n.op == "ConvTranspose" and is_default_domain(n)]:
            plan = _plan(node)
            if plan is not None and plan.mac_ratio <= self.options.max_macs + 1e-9:
                _rewrite(model, node, plan)
                rewritten += 1
        if rewritten:
            toposort_graph(model.graph)
        return PassResult(modified=rewritten > 0, stats={"rewritten": rewritten})


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of the equivalent Conv: {(output phase, input offset): kernel tap}, and its pads."""

    taps: dict[tuple[int, int], int]
    first: int  # d_min
    size: int   # Conv kernel size, d_max - d_min + 1
    pads: tuple[int, int]
    crop: int   # trailing positions past the ConvTranspose's output (its length is no multiple of s)


@dataclass(frozen=True)
class _Plan:
    stride: int
    axes: tuple[_Axis, ...]
    weight: np.ndarray
    bias: np.ndarray | None
    mac_ratio: float


def _plan(node: gs.Node) -> _Plan | None:
    attrs = node.attrs
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not isinstance(weight, gs.Constant) or (bias is not None and not isinstance(bias, gs.Constant)):
        return None
    w = np.asarray(weight.values)
    rank = w.ndim - 2
    strides = list(attrs.get("strides", [1] * rank))
    if rank not in (1, 2) or int(attrs.get("group", 1)) != 1 or any(d != 1 for d in attrs.get("dilations", [1])) \
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or "output_shape" in attrs \
            or len(set(strides)) != 1:
        return None
    pads = list(attrs.get("pads", [0] * 2 * rank))
    extra = list(attrs.get("output_padding", [0] * rank))
    axes = tuple(_axis(w.shape[2 + i], strides[0], pads[i], pads[i + rank], extra[i]) for i in range(rank))
    if any(a is None for a in axes):
        return None
    ratio = float(np.prod([a.size * strides[0] for a in axes]) / np.prod(w.shape[2:]))
    return _Plan(strides[0], axes, w, None if bias is None else np.asarray(bias.values), ratio)


def _axis(k: int, s: int, begin: int, end: int, extra: int) -> _Axis | None:
    taps = {}
    for phase in range(s):
        c, r = divmod(phase + begin, s)
        for m in range((k - r + s - 1) // s if r < k else 0):
            taps[(phase, c - m)] = r + m * s
    if not taps:
        return None
    first, last = min(d for _, d in taps), max(d for _, d in taps)
    size = last - first + 1
    # The ConvTranspose's output is (input - 1)·s + span. The Conv gives input + e positions per phase, the
    # smallest whole number of phases that holds it, so that input + pads - size + 1 = input + e.
    span = k - begin - end + extra
    e = -(-span // s) - 1
    pads = (-first, e + first + size - 1)
    return _Axis(taps, first, size, pads, (e + 1) * s - span) if min(pads) >= 0 else None


def _tap_indices(axes: tuple[_Axis, ...]) -> Iterator[tuple[tuple, tuple]]:
    """(index into the Conv weight reshaped to [C_out, s.., C_in, K..], index into the ConvTranspose weight
    [C_in, C_out, k..]) of every kernel tap; the channel axes are whole slices."""
    for taps in itertools.product(*[a.taps.items() for a in axes]):  # ((phase, offset), tap) per axis
        phases = tuple(phase for (phase, _), _ in taps)
        offsets = tuple(d - a.first for ((_, d), _), a in zip(taps, axes, strict=True))
        yield (slice(None), *phases, slice(None), *offsets), (slice(None), slice(None), *[t for _, t in taps])


def _conv_weights(plan: _Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """[C_out·s^r, C_in, K...] with channels in (o, phase_y, phase_x) order (DepthToSpace's CRD), and the bias
    repeated s^r times."""
    w, s, axes = plan.weight, plan.stride, plan.axes
    c_in, c_out = w.shape[:2]
    out = np.zeros((c_out, *[s] * len(axes), c_in, *[a.size for a in axes]), w.dtype)
    for conv_index, index in _tap_indices(axes):
        out[conv_index] = w[index].T
    bias = None if plan.bias is None else np.repeat(plan.bias, s ** len(axes))
    return out.reshape(c_out * s ** len(axes), c_in, *[a.size for a in axes]), bias


def _convtranspose_weights(w: np.ndarray, axes: tuple[_Axis, ...], s: int, kernel: list[int]) -> np.ndarray:
    """The inverse of _conv_weights: every tap of the ConvTranspose is in exactly one phase."""
    c_out, c_in = w.shape[0] // s ** len(axes), w.shape[1]
    phased = w.reshape(c_out, *[s] * len(axes), c_in, *[a.size for a in axes])
    out = np.zeros((c_in, c_out, *kernel), w.dtype)
    for conv_index, index in _tap_indices(axes):
        out[index] = phased[conv_index].T
    return out


def _json_attrs(attrs: dict) -> dict:
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}


def _rewrite(model: Model, node: gs.Node, plan: _Plan) -> None:
    x, y = node.inputs[0], node.outputs[0]
    weight, bias = _conv_weights(plan)
    _record(model, node.name, {"attrs": _json_attrs(node.attrs), "kernel": list(plan.weight.shape[2:]),
                               "weight": node.inputs[1].name, "bias": node.inputs[2].name if plan.bias is not None
                               else None, "output": y.name, "digest": values_digest(weight)})
    inputs = [x, gs.Constant(model.unique_name(f"{node.name}_conv_weight"), weight)]
    if bias is not None:
        inputs.append(gs.Constant(model.unique_name(f"{node.name}_conv_bias"), bias))
    axes, s = plan.axes, plan.stride
    attrs = {"kernel_shape": [a.size for a in axes], "pads": [a.pads[0] for a in axes] + [a.pads[1] for a in axes],
             "strides": [1] * len(axes), "dilations": [1] * len(axes), "group": 1}
    node.inputs.clear()
    node.outputs.clear()
    model.graph.nodes.remove(node)
    if s == 1:
        model.graph.nodes.append(gs.Node("Conv", node.name, attrs=attrs, inputs=inputs, outputs=[y]))
        return
    phases = gs.Variable(model.unique_name(f"{y.name}_phases"), dtype=y.dtype)
    model.graph.nodes.append(gs.Node("Conv", node.name, attrs=attrs, inputs=inputs, outputs=[phases]))
    activation = _movable_activation(model, y)
    if activation is not None:  # y is read by it alone: it reads the phases, and the interleave writes its output
        out = activation.outputs[0]
        activation.inputs[0] = phases
        phases = gs.Variable(model.unique_name(f"{out.name}_phases"), dtype=out.dtype)
        activation.outputs[0] = phases
        y = out
    crops = [a.crop for a in axes]
    if not any(crops):
        model.graph.nodes += _interleave(model, node.name, phases, y, s, len(axes), plan.weight.shape[1])
        return
    whole = gs.Variable(model.unique_name(f"{y.name}_whole_phases"), dtype=y.dtype)
    model.graph.nodes += _interleave(model, node.name, phases, whole, s, len(axes), plan.weight.shape[1])
    cut = [(2 + i, c) for i, c in enumerate(crops) if c]
    bounds = [gs.Constant(model.unique_name(f"{node.name}_crop_{what}"), np.array(v, np.int64)) for what, v in
              (("starts", [0] * len(cut)), ("ends", [-c for _, c in cut]), ("axes", [a for a, _ in cut]))]
    model.graph.nodes.append(gs.Node("Slice", model.unique_name(f"{node.name}_crop"), inputs=[whole, *bounds],
                                     outputs=[y]))


def _interleave(model: Model, name: str, phases: gs.Variable, y: gs.Variable, s: int, rank: int,
                channels: int) -> list[gs.Node]:
    """Phases [N, C·s^r, ...] to y [N, C, ... · s]: DepthToSpace for 2-D; for 1-D (no such op) a Reshape to
    [N, C, s, L], a Transpose to [N, C, L, s] and a Reshape to [N, C, L·s], which ONNX Runtime runs on the
    integers too."""
    if rank == 2:
        return [gs.Node("DepthToSpace", model.unique_name(f"{name}_depth_to_space"),
                        attrs={"blocksize": s, "mode": "CRD"}, inputs=[phases], outputs=[y])]
    split = gs.Variable(model.unique_name(f"{y.name}_by_phase"), dtype=y.dtype)
    moved = gs.Variable(model.unique_name(f"{y.name}_phase_last"), dtype=y.dtype)
    by_phase = gs.Constant(model.unique_name(f"{name}_by_phase_shape"), np.array([0, channels, s, -1], np.int64))
    merged = gs.Constant(model.unique_name(f"{name}_merged_shape"), np.array([0, channels, -1], np.int64))
    return [gs.Node("Reshape", model.unique_name(f"{name}_split_phases"), inputs=[phases, by_phase], outputs=[split]),
            gs.Node("Transpose", model.unique_name(f"{name}_phase_last"), attrs={"perm": [0, 1, 3, 2]},
                    inputs=[split], outputs=[moved]),
            gs.Node("Reshape", model.unique_name(f"{name}_interleave"), inputs=[moved, merged], outputs=[y])]


def _movable_activation(model: Model, y: gs.Variable) -> gs.Node | None:
    if len(y.outputs) != 1 or is_graph_output(model.graph, y):
        return None
    reader = y.outputs[0]
    if reader.op not in MOVABLE_ACTIVATIONS or not is_default_domain(reader) or reader.inputs[0] is not y \
            or any(t is y for t in reader.inputs[1:]) or len(reader.outputs) != 1:
        return None
    return reader


def _record(model: Model, conv: str, entry: dict) -> None:
    record = rewritten(model)
    record[conv] = entry
    model.metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)


def rewritten(model: Model) -> dict[str, dict]:
    """{Conv name: record} of the ConvTransposes this pass rewrote in `model` and that are not restored."""
    return json.loads(model.metadata.get(METADATA_KEY, "{}"))


def restore(model: Model, names: Iterable[str]) -> list[str]:
    """Turn the rewrites of the Convs in `names` back into the ConvTransposes they were (same weights, attributes
    and names); return those restored. A rewrite whose Conv weight another pass changed since (equalize, smooth),
    or whose phases no longer form one ConvTranspose, stays a Conv (it computes the same)."""
    record = rewritten(model)
    restored = [name for name in sorted(set(names) & set(record)) if _restore_one(model, name, record[name])]
    for name in restored:
        del record[name]
    if record:
        model.metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)
    else:
        model.metadata.pop(METADATA_KEY, None)
    if restored:
        toposort_graph(model.graph)
    return restored


def _restore_one(model: Model, name: str, entry: dict) -> bool:
    conv = next((n for n in model.graph.nodes if n.name == name and n.op == "Conv"), None)
    if conv is None or len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant) \
            or values_digest(np.asarray(conv.inputs[1].values)) != entry["digest"]:
        log.info("convtranspose-to-conv: %s changed since its rewrite, it stays a Conv", name)
        return False
    attrs, kernel = entry["attrs"], entry["kernel"]
    s, rank, axes = _entry_axes(entry)
    chain = _phase_chain(model, conv, s, rank, any(a.crop for a in axes))
    bias = _phase_bias(conv, s ** rank)
    if chain is None or bias is False:
        log.info("convtranspose-to-conv: the phases of %s are no longer one ConvTranspose, it stays a Conv", name)
        return False
    activation, removed, y = chain
    x, weight = conv.inputs[0], _convtranspose_weights(np.asarray(conv.inputs[1].values), axes, s, kernel)
    for node in [conv, *removed]:  # first, so that their names are free again
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes.remove(node)
    inputs = [x, gs.Constant(model.reuse_name(entry["weight"]), weight)]
    if bias is not None:
        inputs.append(gs.Constant(model.reuse_name(entry["bias"] or f"{name}_bias"), bias))
    out = y
    if activation is not None:  # it goes back after the ConvTranspose, and writes the interleave's output
        out = gs.Variable(model.reuse_name(entry["output"]), dtype=y.dtype)
        activation.inputs[0] = out
        activation.outputs[0] = y
    model.graph.nodes.append(gs.Node("ConvTranspose", name, attrs=attrs, inputs=inputs, outputs=[out]))
    return True


def _entry_axes(entry: dict) -> tuple[int, int, tuple[_Axis, ...]]:
    """(stride, spatial rank, _Axis per spatial axis) of a recorded rewrite."""
    attrs, kernel = entry["attrs"], entry["kernel"]
    rank = len(kernel)
    s = int(attrs.get("strides", [1] * rank)[0])
    pads = list(attrs.get("pads", [0] * 2 * rank))
    extra = list(attrs.get("output_padding", [0] * rank))
    return s, rank, tuple(_axis(kernel[i], s, pads[i], pads[i + rank], extra[i]) for i in range(rank))


def float_copy(model: Model) -> tuple[Model, dict[str, str], dict[str, Phases]]:
    """For a float pass over the rewritten model: a copy with its rewrites restored, where that changes no value's
    numbers; {value of `model`: the copy's value with the same numbers in another layout}; {phase Conv output:
    Phases}, for those whose layout differs. ONNX Runtime runs a kernel-2 stride-2 ConvTranspose faster than
    Conv + DepthToSpace (bench/highres_bench.py's U-Net at 512x512, 64 samples: float inference 11.0-11.5 against
    12.8-13.1 s; calibrate recording bias-correct's means, three alternating runs, 14.5-16.9 against 17.4-19.1 s).
    A rewrite whose output is cropped stays: its phase Conv computes values the ConvTranspose does not. `model`
    itself, and nothing renamed, when nothing is restored."""
    plain = {name: entry for name, entry in rewritten(model).items() if not any(a.crop for a in _entry_axes(entry)[2])}
    nodes = {node.name: node for node in model.graph.nodes}
    chains = {}
    for name, entry in plain.items():
        conv = nodes.get(name)
        if conv is not None and conv.op == "Conv":
            s, rank, _ = _entry_axes(entry)
            chain = _phase_chain(model, conv, s, rank, False)
            if chain is not None:
                chains[name] = (conv.outputs[0].name, chain[0] and chain[0].outputs[0].name, s, rank)
    if not chains:
        return model, {}, {}
    copy = model.copy()
    restored = restore(copy, chains)
    if not restored:
        return model, {}, {}
    made = {node.name: node for node in copy.graph.nodes if node.op == "ConvTranspose"}
    renamed, phases = {}, {}
    for name in restored:
        phase, moved, s, rank = chains[name]
        source = made[name].outputs[0]
        if moved is not None:  # the activation's output, now after the ConvTranspose
            renamed[moved] = source.outputs[0].outputs[0].name
        if s > 1:
            renamed[phase] = source.name
            phases[phase] = Phases(source.name, s, rank)
    return copy, renamed, phases


def _phase_chain(model: Model, conv: gs.Node, s: int, rank: int, cropped: bool):
    """(moved activation or None, the interleave and crop nodes, the ConvTranspose's final output) after `conv`,
    as _rewrite wrote them, or None when the graph around it changed."""
    tensor = conv.outputs[0]
    if s == 1:
        return None, [], tensor
    reader = _sole_reader(model, tensor)
    activation = None
    if reader is not None and reader.op in MOVABLE_ACTIVATIONS and reader.inputs[0] is tensor:
        activation, tensor = reader, reader.outputs[0]
        reader = _sole_reader(model, tensor)
    expected = ["DepthToSpace"] if rank == 2 else ["Reshape", "Transpose", "Reshape"]
    removed = []
    for op in expected + ["Slice"] * cropped:
        if reader is None or reader.op != op or reader.inputs[0] is not tensor:
            return None
        removed.append(reader)
        tensor = reader.outputs[0]
        reader = _sole_reader(model, tensor) if len(removed) < len(expected) + cropped else None
    if rank == 2 and (removed[0].attrs.get("blocksize") != s or removed[0].attrs.get("mode") != "CRD"):
        return None
    return activation, removed, tensor


def _sole_reader(model: Model, tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 and not is_graph_output(model.graph, tensor) else None


def _phase_bias(conv: gs.Node, phases: int) -> np.ndarray | None | bool:
    """The ConvTranspose's bias from the Conv's (one value per channel, repeated per phase); None without a bias,
    False when the phases of a channel no longer share one (a per-phase correction)."""
    if len(conv.inputs) < 3 or not conv.inputs[2].name:
        return None
    if not isinstance(conv.inputs[2], gs.Constant):
        return False
    per_phase = np.asarray(conv.inputs[2].values).reshape(-1, phases)
    return per_phase[:, 0].copy() if (per_phase == per_phase[:, :1]).all() else False
