"""Pass `bias-correct`: empirical bias correction (Nagel et al. 2019, Finkelstein et al. 2019).

Weight rounding is not zero-mean per output channel: with ε = W_q − W (W_q the int8 weights that
`insert-qdq` will produce, dequantized) a layer's output shifts by E[ε·x] = ε·E[x]. With the input
channel means E[x_i] measured on the float model over the calibration data, the pass adds
    δ_c = − Σ_i Σ_k ε[c, i, k] · E[x_i]       (Conv, i over the input channels of c's group; Gemm: − ε·E[x])
to every quantized Conv/Gemm bias (border padding, where x is 0, is ignored), and to the constant of the bias Add
after a MatMul with a [K, N] weight (torch's nn.Linear on tokens; E[x] over every axis but the last). A MatMul
with a [K, N] weight and no bias Add (nn.Linear(bias=False): LLaMA-style projections, many qkv layers) gets
one, which carries its output's name, so its calibrated range and its readers stay; in ort-cpu the pair then
runs as one QGemm, as a biased Linear does. Measuring
every layer's shift in one run of a fully quantized model instead would double-count: a layer's shift also
contains the upstream layers' errors, which their own corrections already remove. `mode=empirical`
(bias_empirical.py, the quant pipelines' choice) measures them one layer after another in the quantized model,
each with the layers before it corrected, and so also cancels what those layers add besides weight rounding.
Runs between `calibrate` and `insert-qdq` (the analytic mode only needs the data, not the ranges, but shares
insert-qdq's weight options; the empirical one needs the ranges and all of insert-qdq's options). It corrects
every layer insert-qdq may quantize and records their original biases in the model's metadata: insert-qdq
puts them back on the layers whose weights it leaves float (exclusions, keep-first/last, mixed precision).
Either mode's float pass over the data (the input means; the empirical reference) is taken by `calibrate` when
it runs just before (float_request, irtool/calibration/reference.py; stat `float_passes` 0): on the INT8 bench's
ResNet-50 at 64 samples, the analytic mode took 0.14 s instead of 1.6 s, the empirical one 1.8 s instead of 3.3 s.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.calibration.data import first_batches
from irtool.calibration.reference import FloatReference, Request
from irtool.calibration.tap import batch_free, channel_means, fit_batches, mean_of
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.topo import toposort_graph
from irtool.passes.quant.bias_empirical import biased_output, empirical_shifts, rounded
from irtool.passes.quant.bias_gemm import linear_weight
from irtool.passes.quant.calibrate import stored_profile, stored_ranges
from irtool.passes.quant.insert_qdq import (
    FULL_RANGE,
    INSERTED_BIAS,
    KEPT_FLOAT_KEY,
    REDUCED_RANGE,
    InsertQDQ,
    bias_slot,
    quantize_weight,
    record_bias_corrections,
)
from irtool.passes.quant.placement import Profile, Selection, weight_axis
from irtool.passmanager import Pass, PassContext, PassResult

BIASED = ("Conv", "Gemm")


class Mode(enum.Enum):
    ANALYTIC = "analytic"  # the shift of each layer's own weight rounding, from the float input means
    EMPIRICAL = "empirical"  # each layer's output mean measured in the quantized model (bias_empirical.py)


def _channel_axis(node: gs.Node) -> int:
    return 1 if node.op == "Conv" else -1


def _layers(model: Model) -> list[tuple[gs.Node, tuple[gs.Node, int] | None]]:
    """Each layer to correct and where its bias is: (Conv or Gemm, its input 2, which may not exist yet),
    (MatMul, the constant input of its bias Add) or (MatMul with a [K, N] weight, None: it gets a bias Add).
    A bias computed in the graph is left alone: the correction replaces a constant bias."""
    outputs = {t.name for t in model.graph.outputs}
    layers = []
    for node in Selection().enabled(model):
        if node.op in BIASED and not node.attrs.get("transA", 0) \
                and (len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant)):
            layers.append((node, (node, 2)))
        elif node.op == "MatMul" and (slot := bias_slot(node, outputs)) is not None:
            layers.append((node, slot))
        elif linear_weight(node) is not None:
            layers.append((node, None))
    return layers


def _insert_bias_add(model: Model, matmul: gs.Node) -> tuple[gs.Node, int]:
    """An Add of zeros after the MatMul, taking over its output (name, range, readers); returns its bias slot."""
    out = matmul.outputs[0]
    inner = gs.Variable(model.unique_name(f"{out.name}_unbiased"), dtype=out.dtype, shape=out.shape)
    matmul.outputs[0] = inner
    zeros = gs.Constant(model.unique_name(f"{matmul.name}_bias"),
                        np.zeros(np.shape(matmul.inputs[1].values)[1], np.float32))
    add = gs.Node("Add", name=model.unique_name(f"{matmul.name}_bias_add"), inputs=[inner, zeros], outputs=[out])
    model.graph.nodes.append(add)
    return add, 1


def _original_bias(holder: gs.Node, index: int) -> dict | None:
    """A bias as record_bias_corrections keeps it ({"name", "shape", "values"}; None: there is none)."""
    if len(holder.inputs) > index:
        values = np.asarray(holder.inputs[index].values)
        return {"name": holder.inputs[index].name, "shape": list(values.shape),
                "values": [float(v) for v in values.ravel()]}
    return None


def _add_to_bias(model: Model, layer: gs.Node, holder: gs.Node, index: int, delta: np.ndarray) -> None:
    dtype = np.asarray(layer.inputs[1].values).dtype
    if len(holder.inputs) > index:
        old = holder.inputs[index]
        values = np.asarray(old.values, dtype=np.float64)
        if values.size == delta.size:  # [C], or a bias Add's [1, ..., N]
            bias = values + delta.reshape(values.shape)
        else:  # one value for every channel
            bias = np.broadcast_to(values.reshape(-1), delta.shape) + delta
        name = old.name if old.name.endswith("_corrected") else model.unique_name(f"{old.name}_corrected")
    else:
        bias, name = delta, model.unique_name(f"{layer.name}_bias_corrected")
    constant = gs.Constant(name, bias.astype(dtype))
    if len(holder.inputs) > index:
        holder.inputs[index] = constant
    else:
        holder.inputs.append(constant)


class BiasCorrect(Pass):
    """Correct the per-channel output shift that weight quantization causes (needs calibration data)."""

    name = "bias-correct"

    @dataclass(frozen=True)
    class Options(InsertQDQ.Options):
        """insert-qdq's options, with which mode=empirical makes the quantized copy it measures (and the analytic
        mode reads per-channel and reduce-range): a named pipeline's options reach both passes alike. profile:
        unset, the one calibrate measured for, else ort-cpu. samples: how many calibration samples mode=empirical
        runs (the first batches holding that many). memory-mb: the most memory the values it keeps between layers
        take; past it, later layers are measured on fewer samples (bias_empirical.py). The float outputs that
        min-sqnr's check keeps are bounded by it too, apart."""

        profile: Profile | None = None
        mode: Mode = Mode.ANALYTIC
        samples: int = 64
        memory_mb: int = 1024

        def __post_init__(self):
            super().__post_init__()
            if self.samples < 1:
                raise ValueError("samples must be >= 1")
            if self.memory_mb < 1:
                raise ValueError("memory-mb must be >= 1")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise InputError("bias-correct needs calibration data (--calib-data PATH)")
        empirical = self.options.mode is Mode.EMPIRICAL
        if empirical and stored_ranges(model) is None:
            raise InputError("bias-correct{mode=empirical} measures the quantized model: run `calibrate` before it")
        layers = _layers(model)
        if not layers:  # no data pass for nothing
            return PassResult(modified=False, stats={"layers": 0, "largest_shift": 0.0})
        holders, originals = [], {}
        for node, slot in layers:
            holder, index = slot if slot is not None else _insert_bias_add(model, node)
            originals[node.name] = _original_bias(holder, index) if slot is not None else INSERTED_BIAS
            holders.append((node, holder, index))
        inserted = sum(slot is None for _, slot in layers)
        if inserted:
            toposort_graph(model.graph)
        stats = {"layers": len(layers), "bias_adds_inserted": inserted}
        if empirical:
            data = ctx.calibration_data  # streamed: bias-correct reads the first samples once
            shifts, measured = self._empirical(model, holders,
                                               lambda: first_batches(data(), self.options.samples), ctx)
            stats.update(measured)
        else:
            shifts, stats["float_passes"] = self._analytic(model, holders, ctx)
        for (node, holder, index), delta in zip(holders, shifts, strict=True):
            _add_to_bias(model, node, holder, index, delta)
        record_bias_corrections(model, originals)
        stats["largest_shift"] = round(max(float(np.abs(delta).max()) for delta in shifts), 6)
        return PassResult(modified=True, preserved=("shapes",) if not inserted else (), stats=stats)

    def float_request(self, model: Model) -> Request | None:
        """The float pass of either mode, for calibrate to take in its own (reference.py). Analytic: each layer's
        input sums over every sample. Empirical: each layer's output sums per sample over the first samples, and
        the model outputs for the min-sqnr check. Values and outputs computed once per batch (batch_free) cannot
        be cut per sample and are left to the pass's own float pass."""
        o = self.options
        if o.mode is Mode.ANALYTIC:
            inputs = {node.inputs[0].name: _channel_axis(node) for node, _ in _layers(model)}
            unbatched = batch_free(model, inputs)
            return Request({name: axis for name, axis in inputs.items() if name not in unbatched}, totals=True)
        # A MatMul without a bias Add gets one later, which takes over the MatMul's output name.
        axes = {biased_output(node, slot[0] if slot else node).name: _channel_axis(node)
                for node, slot in _layers(model)}
        outputs = [t.name for t in model.graph.outputs]
        unbatched = batch_free(model, [*axes, *outputs])
        check = o.min_sqnr is not None and not o.keep_fp and not rounded(model) and not unbatched & set(outputs)
        return Request({name: axis for name, axis in axes.items() if name not in unbatched}, o.samples,
                       o.memory_mb * 2**20 if check else 0)

    def _analytic(self, model: Model, holders: list, ctx: PassContext) -> tuple[list[np.ndarray], int]:
        """The shifts, and the float passes run for them (0: the input means are calibrate's)."""
        axes = {n.inputs[0].name: _channel_axis(n) for n, _, _ in holders}
        recorded = ctx.analysis(FloatReference, model)
        if recorded is not None and recorded.serves(axes, fit_batches(model.graph.inputs, ctx.calibration_data()),
                                                    every=True):
            means, passes = {name: mean_of([recorded.totals[name]]) for name in axes}, 0
        else:
            means, passes = channel_means(model, axes, ctx.calibration_data()), 1
        limit = REDUCED_RANGE if self.options.reduce_range else FULL_RANGE
        shifts = [_shift(node, means[node.inputs[0].name], self.options.per_channel, limit) for node, _, _ in holders]
        return shifts, passes

    def _empirical(self, model: Model, holders: list, data, ctx: PassContext) -> tuple[list[np.ndarray], dict]:
        for node, holder, index in holders:  # a zero bias to measure and move in the quantized copy
            if len(holder.inputs) <= index:
                _add_to_bias(model, node, holder, index, np.zeros(_out_channels(node), np.float64))
        o = self.options
        shared = {f.name: getattr(o, f.name) for f in dataclasses.fields(InsertQDQ.Options)}
        quantize = InsertQDQ(**{**shared, "profile": o.profile or stored_profile(model) or Profile.ORT_CPU})
        shifts, stats = empirical_shifts(model, holders, quantize, ctx, data, o.memory_mb * 2**20)
        model.metadata[KEPT_FLOAT_KEY] = json.dumps({"layers": sorted(stats["layers_kept_float"]),
                                                     "min_sqnr": o.min_sqnr, "keep_fp": o.keep_fp})
        return shifts, stats


def _out_channels(node: gs.Node) -> int:
    shape = np.shape(node.inputs[1].values)
    return shape[1] if node.op == "Gemm" and not node.attrs.get("transB", 0) else shape[0]


def _shift(node: gs.Node, input_mean: np.ndarray, per_channel: bool, limit: int) -> np.ndarray:
    w = np.asarray(node.inputs[1].values)
    q, scale = quantize_weight(w, weight_axis(node, per_channel), limit)
    axis = weight_axis(node, per_channel)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    error = q.astype(np.float64) * scale.reshape(shape) - w.astype(np.float64)
    if node.op in ("Gemm", "MatMul"):
        rows = error if node.attrs.get("transB", 0) else error.T
        return -(rows @ input_mean)
    summed = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [out, in per group]
    # Output channel c of a grouped conv reads the input channels of group c // (out / groups) (depthwise:
    # one each, several outputs per input with a channel multiplier).
    groups = int(node.attrs.get("group", 1))
    group_means = np.asarray(input_mean, dtype=np.float64).reshape(groups, summed.shape[1])
    return -(summed * np.repeat(group_means, summed.shape[0] // groups, axis=0)).sum(axis=1)
