"""Weight-only INT8: store MatMul/Gemm weights as int8 and dequantize them in the graph.

For a float32 weight W and output channel c (a column of the weight as the op reads it), symmetric
quantization with zero point 0:

    s_c = max|W[..., c]| / 127            (per-channel; per-tensor: s = max|W| / 127)
    q   = clip(round(W / s_c), -127, 127)  stored as int8  (round half to even; s_c = 1 for an all-zero channel)
    W'  = DequantizeLinear(q, s, axis) = q · s_c,      |W − W'| ≤ s_c / 2 element-wise

-128 is never used, so the grid is symmetric and −W quantizes to −q. The channel axis is the output
axis of the weight: MatMul B[..., K, N] -> axis = rank − 1 (N); Gemm B[K, N] (transB=0) -> axis 1,
B[N, K] (transB=1) -> axis 0. The rewrite is

    Y = MatMul(X, W)   ->   Y = MatMul(X, DequantizeLinear(W_q, W_scale, axis))

and the activation X stays float: the weight bytes shrink about 4x (int8 plus one float32 scale per
channel), ONNX Runtime dequantizes the weight at run time, and the error is the weight rounding only.
Per-channel scales follow each column's range, so one column with an outlier no longer coarsens the
grid of all the others (the outlier only costs its own column).

Quantized: MatMul (second input) and Gemm (input B) in the standard domain whose weight is a float32 or
float16 constant of rank >= 2 (exactly 2 for Gemm) with at least `min-size` elements and only finite values,
unless the node's name matches an `exclude` regex. A weight read by several quantized nodes with the same axis is
quantized once; a reader that is not quantized keeps the float32 original. DequantizeLinear's `axis`
needs opset 13, which irtool's loader already requires. Runs on the main graph only.

A float16 weight (a model `fp16` converted, or exported in half precision) is quantized the same way and
its float32 DequantizeLinear output is Cast to float16, since DequantizeLinear writes float32 only before
opset 19: int8 halves such a weight's bytes, and the error adds float16's rounding of q · s_c. (Before,
such weights were skipped without a word and the pass changed nothing on a float16 model.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import is_default_domain
from irtool.ir.topo import toposort_graph
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

QMAX = 127
SUPPORTED_OPS = ("MatMul", "Gemm")


class QuantDynamic(Pass):
    """Store MatMul/Gemm weights as per-channel symmetric int8 behind a DequantizeLinear (weight-only)."""

    name = "quant-dynamic"

    @dataclass(frozen=True)
    class Options:
        per_channel: bool = True
        op_types: tuple[str, ...] = SUPPORTED_OPS
        exclude: tuple[Regex, ...] = ()
        min_size: int = 1024

        def __post_init__(self):
            unknown = sorted(set(self.op_types) - set(SUPPORTED_OPS))
            if unknown:
                raise ValueError(f"op-types {unknown} are not supported; choose from {list(SUPPORTED_OPS)}")
            if self.min_size < 0:
                raise ValueError(f"min-size must be >= 0, got {self.min_size}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets, skipped = self._targets(model)
        if not targets:
            return PassResult(modified=False, stats={"weights_quantized": 0, **skipped})
        quantizer = _Quantizer(model, self.options.per_channel)
        for node, axis in targets:
            node.inputs[1] = quantizer.dequantized(node.inputs[1], axis)
        toposort_graph(model.graph)
        stats = {**quantizer.stats(), **skipped}
        return PassResult(modified=stats["weights_quantized"] > 0, preserved=(), stats=stats)

    def _targets(self, model: Model) -> tuple[list[tuple[gs.Node, int]], dict[str, int]]:
        targets: list[tuple[gs.Node, int]] = []
        skipped = {"skipped_small": 0, "skipped_excluded": 0}
        for node in model.graph.nodes:
            axis = _channel_axis(node) if node.op in self.options.op_types else None
            if axis is None:
                continue
            if any(re.search(pattern, node.name) for pattern in self.options.exclude):
                skipped["skipped_excluded"] += 1
            elif math.prod(node.inputs[1].shape) < self.options.min_size:
                skipped["skipped_small"] += 1
            else:
                targets.append((node, axis))
        return targets, skipped


def _channel_axis(node: gs.Node) -> int | None:
    """The output-channel axis of the node's float32 or float16 constant weight, or None if it has none."""
    if not is_default_domain(node) or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    weight = node.inputs[1]  # dtype and shape only: lazy values stay unloaded
    rank = len(weight.shape)
    if weight.dtype not in (np.float32, np.float16) or rank < 2:
        return None
    if node.op == "Gemm":
        if rank != 2:
            return None
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return rank - 1


def quantize_symmetric(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) with q = clip(round(W / s), -127, 127); per channel along `axis`, or one
    scale for the whole tensor when axis is None. A zero range gets scale 1 (its values are all 0)."""
    w = weight.astype(np.float64)
    others = tuple(range(w.ndim)) if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    peak = np.abs(w).max(axis=others, initial=0.0, keepdims=True)
    # Floor at the smallest normal float32 so a denormal range cannot round its scale to 0.
    scale = np.where(peak > 0, np.maximum(peak / QMAX, np.finfo(np.float32).tiny), 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.astype(np.float64)), -QMAX, QMAX).astype(np.int8)
    return q, scale.reshape(-1) if axis is not None else scale.reshape(())


class _Quantizer:
    """Creates (once per weight and axis) the int8 constant, its scale and the DequantizeLinear."""

    def __init__(self, model: Model, per_channel: bool):
        self.model, self.per_channel = model, per_channel
        self.done: dict[tuple[int, int], gs.Variable] = {}
        self.nonfinite: set[tuple[int, int]] = set()
        self.bytes_before = self.bytes_after = 0

    def dequantized(self, weight: gs.Constant, axis: int) -> gs.Tensor:
        """The DequantizeLinear output replacing `weight`, or `weight` itself if it holds inf or NaN."""
        key = (id(weight), axis if self.per_channel else -1)
        if key in self.nonfinite or (key not in self.done and not np.isfinite(np.asarray(weight.values)).all()):
            self.nonfinite.add(key)
            return weight
        if key not in self.done:
            self.done[key] = self._quantize(weight, axis)
        return self.done[key]

    def _quantize(self, weight: gs.Constant, axis: int) -> gs.Variable:
        values = np.asarray(weight.values)
        q, scale = quantize_symmetric(values, axis if self.per_channel else None)
        unique = self.model.unique_name
        q_const = gs.Constant(unique(f"{weight.name}_quantized"), q)
        s_const = gs.Constant(unique(f"{weight.name}_scale"), scale)
        out = gs.Variable(unique(f"{weight.name}_dequantized"), dtype=np.float32, shape=list(values.shape))
        attrs = {"axis": axis} if self.per_channel else {}
        node = gs.Node("DequantizeLinear", name=unique(f"{weight.name}_DequantizeLinear"), attrs=attrs,
                       inputs=[q_const, s_const], outputs=[out])
        self.model.graph.nodes.append(node)
        self.bytes_before += values.nbytes
        self.bytes_after += q.nbytes + scale.nbytes
        if values.dtype == np.float16:
            return self._to_half(out, unique)
        return out

    def _to_half(self, value: gs.Variable, unique) -> gs.Variable:
        out = gs.Variable(unique(f"{value.name}_fp16"), dtype=np.float16, shape=value.shape)
        self.model.graph.nodes.append(gs.Node("Cast", name=unique(f"{value.name}_Cast"),
                                              attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[value], outputs=[out]))
        return out

    def stats(self) -> dict[str, float | int]:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else 0.0
        return {"weights_quantized": len(self.done), "weight_bytes_before": self.bytes_before,
                "weight_bytes_after": self.bytes_after, "compression": round(ratio, 3),
                "skipped_nonfinite": len(self.nonfinite)}
