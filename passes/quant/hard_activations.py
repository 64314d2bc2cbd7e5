"""HardSigmoid and HardSwish (MobileNetV3) spelled with ops ONNX Runtime runs on integers, for ort-cpu.

ONNX Runtime has no integer kernel for either, so a quantized MobileNetV3 keeps each one as a float island
between a DQ and a Q (quantize_static's model too). Written as

    HardSigmoid(x) = Clip(x * alpha + beta, 0, 1)           HardSwish(x) = x * HardSigmoid(x), alpha 1/6, beta 1/2

the Mul and Add by constants become QLinearMul and QLinearAdd, the Clip folds into the following Q's range
(ONNX Runtime drops a Clip whose bounds hold the Q's whole range), and the product is a QLinearMul: integers
throughout. The rewrite is exact in float (outputs equal up to rounding of the affine step); the new values'
ranges follow from the input's, so calibration needs nothing more. Applied only where the input is quantized:
in float, four ops would be slower than one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model

Range = tuple[float, float]


def hard_sigmoid_range(low: float, high: float, alpha: float, beta: float) -> Range:
    ends = sorted((alpha * low + beta, alpha * high + beta))
    return min(max(ends[0], 0.0), 1.0), min(max(ends[1], 0.0), 1.0)


def hard_swish_range(low: float, high: float) -> Range:
    """x * clip(x/6 + 1/2, 0, 1) over [low, high]: lowest (-0.375) at x = -1.5, monotone on either side."""
    def f(x: float) -> float:
        return x * min(max(x / 6.0 + 0.5, 0.0), 1.0)
    ends = (f(low), f(high))
    return min(*ends, f(min(max(-1.5, low), high))), max(ends)


def sensitive_interval(node: gs.Node) -> Range | None:
    """Where a HardSigmoid's or HardSwish's output depends on its input: below -beta/alpha it is 0, and above
    (1 - beta)/alpha HardSigmoid is 1 (HardSwish is x there). None for other ops and for alpha <= 0."""
    if node.op not in ("HardSigmoid", "HardSwish"):
        return None
    alpha, beta = parameters(node)
    if alpha <= 0:
        return None
    return -beta / alpha, (1.0 - beta) / alpha if node.op == "HardSigmoid" else float("inf")


def parameters(node: gs.Node) -> tuple[float, float]:
    """HardSigmoid's alpha and beta (ONNX's defaults 0.2, 0.5); HardSwish's fixed 1/6, 1/2."""
    if node.op == "HardSwish":
        return 1.0 / 6.0, 0.5
    return float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))


def decompose(model: Model, ranges: dict[str, list[float]], quantized: set[str]) -> int:
    """Rewrite every HardSigmoid/HardSwish whose input is in `quantized`; add the new values' ranges to `ranges`
    (the input's range mapped). Returns the number rewritten."""
    count = 0
    for node in [n for n in model.graph.nodes if n.op in ("HardSigmoid", "HardSwish")]:
        x = node.inputs[0]
        if x.name not in quantized or x.name not in ranges:
            continue
        _rewrite(model, node, ranges)
        count += 1
    return count


def _rewrite(model: Model, node: gs.Node, ranges: dict[str, list[float]]) -> None:
    x, y = node.inputs[0], node.outputs[0]
    alpha, beta = parameters(node)
    low, high = ranges[x.name]
    base = node.name or y.name

    def value(suffix: str, bounds: Range) -> gs.Variable:
        tensor = gs.Variable(model.unique_name(f"{base}/{suffix}"), dtype=np.float32, shape=x.shape)
        ranges[tensor.name] = [float(b) for b in bounds]
        return tensor

    def const(suffix: str, v: float) -> gs.Constant:
        return gs.Constant(model.unique_name(f"{base}/{suffix}"), np.asarray(v, np.float32))

    scaled = value("scaled", sorted((alpha * low, alpha * high)))
    shifted = value("shifted", sorted((alpha * low + beta, alpha * high + beta)))
    gate = y if node.op == "HardSigmoid" else value("gate", hard_sigmoid_range(low, high, alpha, beta))
    ranges.setdefault(y.name, list(hard_sigmoid_range(low, high, alpha, beta) if node.op == "HardSigmoid"
                                   else hard_swish_range(low, high)))
    node.outputs.clear()
    new = [gs.Node("Mul", model.unique_name(f"{base}/Mul"), inputs=[x, const("alpha", alpha)], outputs=[scaled]),
           gs.Node("Add", model.unique_name(f"{base}/Add"), inputs=[scaled, const("beta", beta)], outputs=[shifted]),
           gs.Node("Clip", model.unique_name(f"{base}/Clip"),
                   inputs=[shifted, const("zero", 0.0), const("one", 1.0)], outputs=[gate])]
    if node.op == "HardSwish":
        new.append(gs.Node("Mul", model.unique_name(f"{base}/Product"), inputs=[x, gate], outputs=[y]))
    node.inputs.clear()
    model.graph.nodes.remove(node)
    model.graph.nodes.extend(new)
