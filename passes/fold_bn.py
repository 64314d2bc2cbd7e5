"""Fold an inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

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
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose or Gemm."""

    name = "fold-bn"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = 0
        for graph in list(model.graphs()):
            with GraphEdit(graph) as edit:
                for node in list(graph.nodes):
                    if node.op == "BatchNormalization" and _fold_one(model, edit, node):
                        folded += 1
        return PassResult(modified=folded > 0, preserved=(), stats={"bn_folded": folded})


def _fold_one(model: Model, edit: GraphEdit, bn: gs.Node) -> bool:
    producer = _foldable_producer(edit, bn)
    if producer is None:
        return False
    params = _bn_scale_shift(bn)
    weight, bias = producer.inputs[1], _bias_input(producer)
    if params is None or not _is_float_constant(weight) or (bias is not None and not _is_float_constant(bias)):
        return False
    s, t = params
    result = FOLDERS[producer.op](producer, np.asarray(weight.values), None if bias is None else
                                  np.asarray(bias.values), s, t)
    if result is None:
        return False
    _apply(model, edit, bn, producer, result)
    return True


def _foldable_producer(edit: GraphEdit, bn: gs.Node) -> gs.Node | None:
    graph = edit.graph
    if not is_default_domain(bn) or bn.attrs.get("training_mode", 0):
        return None
    if any(t.name and is_used(graph, t) for t in bn.outputs[1:]) or len(bn.inputs) != 5:
        return None
    y = bn.inputs[0]
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


def _apply(model: Model, edit: GraphEdit, bn: gs.Node, producer: gs.Node,
           result: tuple[np.ndarray, np.ndarray, dict]) -> None:
    new_weight, new_bias, attrs = result
    weight, bias = producer.inputs[1], _bias_input(producer)
    dtype = np.asarray(weight.values).dtype
    producer.inputs[1] = gs.Constant(model.unique_name(f"{weight.name}_bn"), new_weight.astype(dtype))
    bias_name = model.unique_name(f"{bias.name}_bn" if bias is not None else f"{producer.name}_bias_bn")
    bias_tensor = gs.Constant(bias_name, new_bias.astype(dtype))
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias_tensor
    else:
        producer.inputs.append(bias_tensor)
    producer.attrs.update(attrs)
    out = bn.outputs[0]
    edit.remove(bn)
    producer.outputs[0] = out


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
