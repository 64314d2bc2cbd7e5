"""Pass `smooth`: SmoothQuant (Xiao et al. 2023) for the linear layers after a LayerNormalization.

Transformer activations carry a few channels with values tens of times larger than the rest (BERT's and
MiniLM's outlier features after LayerNorm), so one per-tensor INT8 scale for the activation wastes its grid on
them, while the weights that read those channels are unremarkable. For the LayerNorm output X [.., C] and every
MatMul that reads it with a constant weight W [C, N],

    X' = X / s,   W'[j, :] = s_j · W[j, :],   s_j = max|X_j|^α / max|W_j|^(1-α)   (clipped to [1e-5, 1e5])

leaves X'·W' = X·W unchanged (exact in real arithmetic) and moves part of each channel's range from the
activation into the weight, which per-channel weight quantization absorbs. X / s is folded into the
LayerNorm's scale and bias (γ' = γ / s, β' = β / s), so no op is added; max|X_j| is measured on the
calibration data (ReduceMax of |X| in the graph). α = 0.5 is the paper's default; larger moves more.

Smoothed: a LayerNormalization over the last axis with constant scale (and bias, if any), or a norm exported
decomposed (opset < 17: ReduceMean, Sub, Pow, ..., Div) whose last steps are a Mul by a constant γ per channel
and an Add of a constant β, whose output only MatMuls read, each as its first operand with a constant float32
[C, N] weight, and which is not a graph output. (Any per-channel Mul [+ Add] by constants qualifies: dividing
its output by s is dividing its constants.)
Shared weights get copies (the other readers keep theirs). Run before `calibrate`: the ranges it measures are
then the smoothed ones.

`min-spread` smooths only the LayerNorms whose largest channel peak is at least that many times their median
channel peak: outlier channels. Without outliers smoothing gains nothing (measured: the test encoder and the
bench's ViT within ±0.1 dB; their spreads are 1.4-6) while every row it scales coarsens its weight columns'
grids, so the quant pipelines run `smooth{min-spread=8}`: BERT-class outliers are 10-100x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.calibration.tap import channel_abs_max
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.rewrite import is_default_domain
from irtool.passes.quant.bias_gemm import linear_weight
from irtool.passmanager import Pass, PassContext, PassResult

SCALE_LIMITS = (1e-5, 1e5)


@dataclass
class _Target:
    y: gs.Tensor
    params: list[tuple[gs.Node, int]]  # the constants (node, input index) whose channels scale y
    matmuls: list[gs.Node]


class Smooth(Pass):
    """SmoothQuant: move activation outliers after a LayerNorm into the weights of the MatMuls that read it."""

    name = "smooth"

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5
        min_spread: float = 0.0

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
            if self.min_spread < 0:
                raise ValueError(f"min-spread must be >= 0, got {self.min_spread}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets = _targets(model)
        if not targets:  # no data pass (and no data needed) for a model without LayerNorm -> MatMul
            return PassResult(modified=False, stats={"norms": 0, "layers": 0})
        if ctx.calibration_data is None:
            raise InputError("smooth needs calibration data (--calib-data PATH)")
        peaks = channel_abs_max(model, [t.y.name for t in targets], ctx.calibration_data())
        spreads = {id(t): _spread(peaks[t.y.name]) for t in targets}
        chosen = [t for t in targets if spreads[id(t)] >= self.options.min_spread]
        largest = 1.0
        for target in chosen:
            scale = _scales(peaks[target.y.name], target.matmuls, self.options.alpha)
            _apply(model, target, scale)
            largest = max(largest, float(scale.max()), float(1 / scale.min()))
        return PassResult(modified=bool(chosen), preserved=("shapes",), stats={
            "norms": len(chosen), "layers": sum(len(t.matmuls) for t in chosen),
            "norms_without_outliers": len(targets) - len(chosen), "largest_factor": round(largest, 3),
            "largest_spread": round(max(spreads.values()), 2)})


def _targets(model: Model) -> list[_Target]:
    outputs = {t.name for t in model.graph.outputs}
    found = []
    for node in model.graph.nodes:
        params = _norm_params(node) if is_default_domain(node) else None
        if params is None:
            continue
        y = node.outputs[0]
        readers = list(y.outputs)
        if y.name in outputs or not readers or any(t.outputs for t in node.outputs[1:]):
            continue
        if all(_reads_as_input(m, y) for m in readers):
            found.append(_Target(y, params, readers))
    return found


def _norm_params(node: gs.Node) -> list[tuple[gs.Node, int]] | None:
    """The per-channel constants that scale `node`'s output: a LayerNormalization's scale and bias, or the γ of a
    Mul(x, γ) and the β of an Add(Mul(x, γ), β) (a decomposed norm's last steps)."""
    if node.op == "LayerNormalization":
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        axis = int(node.attrs.get("axis", -1))
        params = [(node, i) for i in range(1, min(len(node.inputs), 3))]
        last_axis = axis == -1 or (rank is not None and axis == rank - 1)
        return params if last_axis and all(_channel_constant(n.inputs[i]) for n, i in params) else None
    if node.op == "Add":
        mul_side = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)]
        if len(node.inputs) != 2 or len(mul_side) != 1 or not _channel_constant(node.inputs[1 - mul_side[0]]):
            return None
        x = node.inputs[mul_side[0]]
        mul = x.inputs[0] if x.inputs and len(x.outputs) == 1 else None
        gamma = _norm_params(mul) if mul is not None and mul.op == "Mul" else None
        return None if gamma is None else [*gamma, (node, 1 - mul_side[0])]
    if node.op == "Mul" and len(node.inputs) == 2:
        constants = [i for i, t in enumerate(node.inputs) if _channel_constant(t)]
        if len(constants) == 1 and not isinstance(node.inputs[1 - constants[0]], gs.Constant):
            return [(node, constants[0])]
    return None


def _channel_constant(tensor: gs.Tensor) -> bool:
    """A float constant of one value per channel of the last axis: [C] (a [1, ..., C] could raise the rank)."""
    return isinstance(tensor, gs.Constant) and np.ndim(tensor.values) == 1 \
        and np.asarray(tensor.values).dtype.kind == "f" and np.size(tensor.values) > 1


def _reads_as_input(node: gs.Node, y: gs.Tensor) -> bool:
    return node.inputs[0] is y and linear_weight(node) is not None


def _spread(peak: np.ndarray) -> float:
    """The largest channel peak over the median one (inf when most channels never leave 0)."""
    median = float(np.median(peak))
    return float(peak.max()) / median if median > 0 else float("inf")


def _scales(peak: np.ndarray, matmuls: list[gs.Node], alpha: float) -> np.ndarray:
    weight_peak = np.max([np.abs(np.asarray(m.inputs[1].values, np.float64)).max(axis=1) for m in matmuls], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.power(peak, alpha) / np.power(weight_peak, 1.0 - alpha)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)  # a channel never active, or a zero weight row
    return np.clip(scale, *SCALE_LIMITS)


def _apply(model: Model, target: _Target, scale: np.ndarray) -> None:
    for node, index in target.params:
        old = node.inputs[index]
        values = np.asarray(old.values)
        node.inputs[index] = gs.Constant(model.unique_name(f"{old.name}_smoothed"),
                                         (values.astype(np.float64) / scale).astype(values.dtype))
    for matmul in target.matmuls:
        old = matmul.inputs[1]
        values = np.asarray(old.values)
        matmul.inputs[1] = gs.Constant(model.unique_name(f"{old.name}_smoothed"),
                                       (values.astype(np.float64) * scale[:, None]).astype(values.dtype))
