"""Ranges that follow from another tensor's range, so `calibrate` need not observe them.

An elementwise function of one observed value maps its range exactly when the function is monotone (Sigmoid,
LeakyRelu with alpha >= 0, HardSigmoid), or when its extremes on an interval are known (SiLU, x * Sigmoid(x):
one minimum at x = -1.2785; HardSwish: -0.375 at x = -1.5). For minmax the derived range is the observed one;
for the clipping methods it is the image of the input's clipped range. In a SiLU net (EfficientNet, YOLO) each
activation is a conv output, its Sigmoid and their product: observing only the conv output (and giving
Split/Slice/Gather outputs their input's statistics, calibrate.permutation_sources) takes EfficientNet-B0's
calibration graph from 238 observed tensors to 124.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.passes.quant.hard_activations import hard_sigmoid_range, hard_swish_range, parameters

Range = tuple[float, float]
SILU_ARGMIN = -1.2784645  # where x * sigmoid(x) is lowest (-0.2785), the root of 1 + e^-x + x e^-x = 0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _silu(x: float) -> float:
    return x * _sigmoid(x)


def sigmoid_range(low: float, high: float) -> Range:
    return _sigmoid(low), _sigmoid(high)


def silu_range(low: float, high: float) -> Range:
    ends = (_silu(low), _silu(high))
    return min(*ends, _silu(min(max(SILU_ARGMIN, low), high))), max(ends)


def leaky_relu_range(alpha: float) -> Callable[[float, float], Range]:
    def mapped(low: float, high: float) -> Range:
        return tuple(v if v >= 0 else alpha * v for v in (low, high))
    return mapped


def derived_tensors(model: Model, names: list[str]) -> dict[str, tuple[str, Callable[[float, float], Range]]]:
    """{name: (input, f)} for the candidates whose range is f(the range of another candidate, input)."""
    candidates = set(names)
    tensors = model.graph.tensors()
    out = {}
    for name in names:
        producer = tensors[name].inputs[0] if len(tensors[name].inputs) == 1 else None
        rule = None if producer is None else _rule(producer, candidates)
        if rule is not None:
            out[name] = rule
    return out


def silu_tail(high: float, levels: int = 255) -> float:
    """The T > 1.28 where |SiLU(-T)| = T * sigmoid(-T) is half a step of a SiLU output quantized over
    [SiLU's minimum, SiLU(high)]: below -T every input gives an output within that half step of 0, so an input
    range cut there rounds no output by more than its own quantization already does."""
    half_step = (_silu(max(high, 0.0)) - _silu(SILU_ARGMIN)) / levels / 2
    low, high_t = -SILU_ARGMIN, 60.0
    for _ in range(60):  # bisection: T * sigmoid(-T) falls monotonically past the argmin
        mid = (low + high_t) / 2
        low, high_t = (mid, high_t) if -_silu(-mid) > half_step else (low, mid)
    return high_t


def silu_input(tensor: gs.Tensor) -> bool:
    """Read exactly by a Sigmoid and by the Mul of the tensor and that Sigmoid's output (SiLU, spelled out)."""
    readers = tensor.outputs
    if sorted(r.op for r in readers) != ["Mul", "Sigmoid"]:
        return False
    mul = next(r for r in readers if r.op == "Mul")
    sigmoid = next(r for r in readers if r.op == "Sigmoid")
    return sorted(t.name for t in mul.inputs) == sorted((tensor.name, sigmoid.outputs[0].name))


def _rule(node: gs.Node, candidates: set[str]):
    observed_input = bool(node.inputs) and node.inputs[0].name in candidates
    if node.op == "Sigmoid" and observed_input:
        return node.inputs[0].name, sigmoid_range
    if node.op == "LeakyRelu" and observed_input:
        alpha = float(node.attrs.get("alpha", 0.01))  # ONNX's default
        return (node.inputs[0].name, leaky_relu_range(alpha)) if alpha >= 0 else None
    if node.op in ("HardSigmoid", "HardSwish") and observed_input:
        return node.inputs[0].name, _hard_range(node)
    if node.op == "Mul" and len(node.inputs) == 2:
        for x, gate in (node.inputs, node.inputs[::-1]):
            if _is_sigmoid_of(gate, x) and x.name in candidates:
                return x.name, silu_range
    return None


def _hard_range(node: gs.Node) -> Callable[[float, float], Range]:
    if node.op == "HardSwish":
        return hard_swish_range
    alpha, beta = parameters(node)
    return lambda low, high: hard_sigmoid_range(low, high, alpha, beta)


def _is_sigmoid_of(gate: gs.Tensor, x: gs.Tensor) -> bool:
    return len(gate.inputs) == 1 and gate.inputs[0].op == "Sigmoid" and gate.inputs[0].inputs[0] is x
