"""Fold an inference BatchNormalization, or a per-channel Mul/Div/Add/Sub by a constant, into the Conv,
ConvTranspose or Gemm that feeds it.

BatchNormalization computes, per channel c of its input y,

    BN(y) = γ·(y − μ)/sqrt(σ² + ε) + β = y·s + t,   s = γ/sqrt(σ² + ε),   t = β − μ·s.

The producer is linear in its weight and adds a per-channel bias, y = W∗x + b, so

    BN(W∗x + b) = (W·s)∗x + (b·s + t),   i.e.   W' = W·s (per output channel),  b' = (b − μ)·s + β.

Where the output channel lives in the weight:
    Conv           W[C_out, C_in/g, k...]        scale axis 0 (groups change nothing)
    ConvTranspose  W[C_in, C_out/g, k...]        output channel c = j·(C_out/g) + o for group j: view W
                                                 as [g, C_in/g, C_out/g, k...] and scale by s[j, o]
    Gemm           B[K, M] (transB=0) or B[M, K] (transB=1); Y = α·A·B + β_g·C, channel = column M:
                   B' = B·s on the M axis, C' = (β_g·C)·s + t (broadcast), β_g' = 1

Folds only when it is exact in exact arithmetic: the BN is in inference form (training_mode unset,
only its first output used), its parameters and the producer's weight/bias are constants of a float
type, the producer sits in the same graph, and the BN is the producer output's only reader (not a
graph output either). Otherwise the pass declines. New weights get fresh names, so a weight shared
with another node is never changed under it; the producer takes over the BN's output name.
Arithmetic runs in float64 and is rounded once to the weight's dtype.

The same fold takes the affine ops that a batch norm decomposed by its exporter (Mul by γ/σ, then Add of
β − μγ/σ) or a bias kept apart from its layer (Conv without bias, then Add) leave behind: y·v, y/v, y + v,
y − v and v − y, where the constant v holds one value per output channel (shape [C, 1, 1], [1, C, 1, 1], [1, C],
...) or one value, is finite (and non-zero for Div). They are s = v, 1/v, 1, 1, −1 and t = 0, 0, v, −v, v.
Left apart, each became its own QLinearMul/QLinearAdd in the INT8 model, the layer's output quantized once more
before it (ONNX Runtime's quantize_static leaves them so too, unless its quant_pre_process fused them in float
first): on tests/quant/test_affine_fold_quant.py's two-layer net, 33.3 dB unfolded, 31.4 dB quantize_static,
43.3 dB folded. A chain (Conv, Mul, Add, BatchNormalization) folds in one run, in graph order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import GraphEdit, is_default_domain, is_graph_output, is_used
from irtool.passmanager import Pass, PassContext, PassResult

# (producer, weight, bias or None, s, t) -> (new weight, new bias, attributes to set) or None to decline.
Folder = Callable[[gs.Node, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray],
                  tuple[np.ndarray, np.ndarray, dict] | None]


class FoldBatchNorm(Pass):
    """Fold BatchNormalization and per-channel constant Mul/Div/Add/Sub into the Conv, ConvTranspose or Gemm before."""

    name = "fold-bn"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        counts = {"bn_folded": 0, "affine_folded": 0}
        for graph in list(model.graphs()):
            with GraphEdit(graph) as edit:
                for node in list(graph.nodes):
                    if node.op == "BatchNormalization" and _fold_bn(model, edit, node):
                        counts["bn_folded"] += 1
                    elif node.op in AFFINE_OPS and _fold_affine(model, edit, node):
                        counts["affine_folded"] += 1
        return PassResult(modified=any(counts.values()), preserved=(), stats=counts)


AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})


def _fold_bn(model: Model, edit: GraphEdit, bn: gs.Node) -> bool:
    if bn.attrs.get("training_mode", 0) or len(bn.inputs) != 5:
        return False
    if any(t.name and is_used(edit.graph, t) for t in bn.outputs[1:]):
        return False
    producer = _foldable_producer(edit, bn, bn.inputs[0])
    params = None if producer is None else _bn_scale_shift(bn)
    return params is not None and _fold_into(model, edit, bn, producer, *params)


def _fold_affine(model: Model, edit: GraphEdit, node: gs.Node) -> bool:
    if len(node.inputs) != 2:
        return False
    for index, (y, v) in enumerate((node.inputs, node.inputs[::-1])):
        if not _is_float_constant(v) or (index == 1 and node.op == "Div"):
            continue  # v / y is not affine in y
        producer = _foldable_producer(edit, node, y)
        vector = None if producer is None else _channel_vector(producer, np.asarray(v.values))
        if vector is None:
            continue
        s, t = _affine(node.op, vector, y_first=index == 0)
        return bool(np.isfinite(s).all() and np.isfinite(t).all()) and _fold_into(model, edit, node, producer, s, t)
    return False


def _affine(op: str, v: np.ndarray, y_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of the op as y·s + t; Div's v is non-zero (checked by the caller's finiteness test)."""
    ones, zeros = np.ones_like(v), np.zeros_like(v)
    if op == "Mul":
        return v, zeros
    if op == "Div":
        with np.errstate(divide="ignore"):
            return 1.0 / v, zeros
    if op == "Add":
        return ones, v
    return (ones, -v) if y_first else (-ones, v)  # Sub: y - v, or v - y


def _channel_vector(producer: gs.Node, v: np.ndarray) -> np.ndarray | None:
    """v as one float64 value per output channel of the producer, or None when it broadcasts along other axes
    (or would raise the output's rank)."""
    channels, rank = _output_channels(producer)
    if channels is None or v.ndim > rank:
        return None
    if v.size == 1:
        return np.full(channels, float(v.reshape(())), np.float64)
    shape = (1,) * (rank - v.ndim) + v.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return v.reshape(-1).astype(np.float64)


def _output_channels(producer: gs.Node) -> tuple[int | None, int]:
    """(output channels, output rank) from the producer's weight: Conv/ConvTranspose [N, C, spatial...], Gemm [N, M]."""
    weight = producer.inputs[1]
    if not _is_float_constant(weight):
        return None, 0
    shape = np.asarray(weight.values).shape
    if producer.op == "Gemm":
        return (shape[1 - int(producer.attrs.get("transB", 0))], 2) if len(shape) == 2 else (None, 0)
    if len(shape) < 3:
        return None, 0
    if producer.op == "ConvTranspose":
        return shape[1] * int(producer.attrs.get("group", 1)), len(shape)
    return shape[0], len(shape)


def _fold_into(model: Model, edit: GraphEdit, follower: gs.Node, producer: gs.Node, s: np.ndarray,
               t: np.ndarray) -> bool:
    weight, bias = producer.inputs[1], _bias_input(producer)
    if not _is_float_constant(weight) or (bias is not None and not _is_float_constant(bias)):
        return False
    result = FOLDERS[producer.op](producer, np.asarray(weight.values), None if bias is None else
                                  np.asarray(bias.values), s, t)
    if result is None:
        return False
    _apply(model, edit, follower, producer, result)
    return True


def _foldable_producer(edit: GraphEdit, follower: gs.Node, y: gs.Tensor) -> gs.Node | None:
    """The Conv, ConvTranspose or Gemm in this graph whose output is `y` and only `follower` reads."""
    graph = edit.graph
    if not is_default_domain(follower):
        return None
    producer = edit.produced_here(y)
    if producer is None or producer.op not in FOLDERS or not is_default_domain(producer):
        return None
    if len(y.outputs) != 1 or is_graph_output(graph, y) or producer.outputs[0] is not y:
        return None
    return producer if len(producer.inputs) >= 2 else None


def _bias_input(producer: gs.Node) -> gs.Tensor | None:
    if len(producer.inputs) > 2 and producer.inputs[2].name:
        return producer.inputs[2]
    return None


def _is_float_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and np.issubdtype(np.asarray(tensor.values).dtype, np.floating)


def _bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel s and t (float64) of BN(y) = y·s + t, or None unless all parameters are 1-D constants."""
    params = bn.inputs[1:5]
    if not all(_is_float_constant(p) for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
    if gamma.ndim != 1 or not gamma.shape == beta.shape == mean.shape == var.shape:
        return None
    denominator = var + float(bn.attrs.get("epsilon", 1e-5))
    if not np.all(denominator > 0):
        return None  # NaN or infinite scales: leave the BN to produce what it produces
    s = gamma / np.sqrt(denominator)
    return s, beta - mean * s


def _apply(model: Model, edit: GraphEdit, follower: gs.Node, producer: gs.Node,
           result: tuple[np.ndarray, np.ndarray, dict]) -> None:
    new_weight, new_bias, attrs = result
    weight, bias = producer.inputs[1], _bias_input(producer)
    dtype = np.asarray(weight.values).dtype
    suffix = "_bn" if follower.op == "BatchNormalization" else "_folded"
    producer.inputs[1] = gs.Constant(_folded_name(model, weight.name, suffix), new_weight.astype(dtype))
    bias_name = _folded_name(model, bias.name if bias is not None else f"{producer.name}_bias", suffix)
    bias_tensor = gs.Constant(bias_name, new_bias.astype(dtype))
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias_tensor
    else:
        producer.inputs.append(bias_tensor)
    producer.attrs.update(attrs)
    out = follower.outputs[0]
    edit.remove(follower)
    producer.outputs[0] = out


def _folded_name(model: Model, name: str, suffix: str) -> str:
    """name + suffix, without piling suffixes up along a chain of folds (w_bn, not w_folded_bn)."""
    for known in ("_bn", "_folded"):
        name = name.removesuffix(known)
    return model.unique_name(name + suffix)


# --------------------------------------------------------------------------- per-op folders
def _channel_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    b = np.zeros_like(s) if bias is None else bias.astype(np.float64)
    return b * s + t


def _fold_conv(node: gs.Node, w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray):
    if w.ndim < 3 or w.shape[0] != s.shape[0] or (bias is not None and bias.shape != s.shape):
        return None
    scale = s.reshape((-1,) + (1,) * (w.ndim - 1))
    return w.astype(np.float64) * scale, _channel_bias(bias, s, t), {}


def _fold_conv_transpose(node: gs.Node, w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray):
    group = int(node.attrs.get("group", 1))
    if w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != s.shape[0] \
            or (bias is not None and bias.shape != s.shape):
        return None
    kernel = w.shape[2:]
    grouped = w.astype(np.float64).reshape((group, w.shape[0] // group, w.shape[1]) + kernel)
    scale = s.reshape((group, 1, w.shape[1]) + (1,) * len(kernel))
    return (grouped * scale).reshape(w.shape), _channel_bias(bias, s, t), {}


def _fold_gemm(node: gs.Node, b: np.ndarray, c: np.ndarray | None, s: np.ndarray, t: np.ndarray):
    trans_b = int(node.attrs.get("transB", 0))
    if b.ndim != 2 or b.shape[1 - trans_b] != s.shape[0]:
        return None
    scale = s.reshape(-1, 1) if trans_b else s.reshape(1, -1)
    beta = float(node.attrs.get("beta", 1.0))
    if c is None:
        new_c = t
    else:
        new_c = beta * c.astype(np.float64) * s + t
        if new_c.ndim > 2:
            return None
    return b.astype(np.float64) * scale, new_c, {"beta": 1.0}


FOLDERS: dict[str, Folder] = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
}
