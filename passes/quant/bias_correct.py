"""Pass `bias-correct`: empirical bias correction (Nagel et al. 2019, Finkelstein et al. 2019).

Weight rounding is not zero-mean per output channel: with ε = W_q − W (W_q the int8 weights that
`insert-qdq` will produce, dequantized) a layer's output shifts by E[ε·x] = ε·E[x]. With the input
channel means E[x_i] measured on the float model over the calibration data, the pass adds
    δ_c = − Σ_i Σ_k ε[c, i, k] · E[x_i]       (Conv, i over the input channels of c's group; Gemm: − ε·E[x])
to every quantized Conv/Gemm bias (border padding, where x is 0, is ignored). Measuring each layer's
shift in a fully quantized model instead would double-count: a layer's shift also contains the
upstream layers' errors, which their own corrections already remove. Runs between `calibrate` and
`insert-qdq` (it only needs the data, not the ranges, but shares insert-qdq's weight options). It corrects
every layer insert-qdq may quantize and records their original biases in the model's metadata: insert-qdq
puts them back on the layers whose weights it leaves float (exclusions, keep-first/last, mixed precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.calibration.tap import channel_means
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.passes.quant.insert_qdq import FULL_RANGE, REDUCED_RANGE, quantize_weight, record_bias_corrections
from irtool.passes.quant.placement import Selection, weight_axis
from irtool.passmanager import Pass, PassContext, PassResult

BIASED = ("Conv", "Gemm")


def _channel_axis(node: gs.Node) -> int:
    return 1 if node.op == "Conv" else -1


def _original_bias(node: gs.Node) -> dict | None:
    if len(node.inputs) > 2:
        values = np.asarray(node.inputs[2].values)
        return {"name": node.inputs[2].name, "shape": list(values.shape), "values": [float(v) for v in values.ravel()]}
    return None


def _add_to_bias(model: Model, node: gs.Node, delta: np.ndarray) -> None:
    w = np.asarray(node.inputs[1].values)
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        old = node.inputs[2]
        bias = np.broadcast_to(np.asarray(old.values, dtype=np.float64), delta.shape) + delta
        name = old.name if old.name.endswith("_corrected") else model.unique_name(f"{old.name}_corrected")
    else:
        bias, name = delta, model.unique_name(f"{node.name}_bias_corrected")
    constant = gs.Constant(name, bias.astype(w.dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = constant
    else:
        node.inputs.append(constant)


class BiasCorrect(Pass):
    """Correct the per-channel output shift that weight quantization causes (needs calibration data)."""

    name = "bias-correct"

    @dataclass(frozen=True)
    class Options:
        per_channel: bool = True
        reduce_range: bool = True  # as insert-qdq's ort-cpu default; set false for trt or full-range weights

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise InputError("bias-correct needs calibration data (--calib-data PATH)")
        # A bias computed in the graph is left alone: the correction replaces a constant bias.
        layers = [n for n in Selection().enabled(model) if n.op in BIASED and not n.attrs.get("transA", 0)
                  and (len(n.inputs) < 3 or isinstance(n.inputs[2], gs.Constant))]
        if not layers:  # no data pass for nothing (a transformer exported with MatMul + Add only)
            return PassResult(modified=False, stats={"layers": 0, "largest_shift": 0.0})
        axes = {n.inputs[0].name: _channel_axis(n) for n in layers}
        means = channel_means(model, axes, ctx.calibration_data())
        largest, originals = 0.0, {}
        for node in layers:
            delta = _shift(node, means[node.inputs[0].name], self.options.per_channel,
                           REDUCED_RANGE if self.options.reduce_range else FULL_RANGE)
            originals[node.name] = _original_bias(node)
            _add_to_bias(model, node, delta)
            largest = max(largest, float(np.abs(delta).max()))
        record_bias_corrections(model, originals)
        return PassResult(modified=bool(layers), preserved=("shapes",),
                          stats={"layers": len(layers), "largest_shift": round(largest, 6)})


def _shift(node: gs.Node, input_mean: np.ndarray, per_channel: bool, limit: int) -> np.ndarray:
    w = np.asarray(node.inputs[1].values)
    q, scale = quantize_weight(w, weight_axis(node, per_channel), limit)
    axis = weight_axis(node, per_channel)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    error = q.astype(np.float64) * scale.reshape(shape) - w.astype(np.float64)
    if node.op == "Gemm":
        rows = error if node.attrs.get("transB", 0) else error.T
        return -(rows @ input_mean)
    summed = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [out, in per group]
    # Output channel c of a grouped conv reads the input channels of group c // (out / groups) (depthwise:
    # one each, several outputs per input with a channel multiplier).
    groups = int(node.attrs.get("group", 1))
    group_means = np.asarray(input_mean, dtype=np.float64).reshape(groups, summed.shape[1])
    return -(summed * np.repeat(group_means, summed.shape[0] // groups, axis=0)).sum(axis=1)
