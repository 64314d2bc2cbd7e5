"""Unstructured sparsity: zero (not remove) the smallest weights of Conv, ConvTranspose, Gemm and MatMul.

magnitude  zero the `ratio` fraction of weights with the smallest |w|, per layer or with one
           threshold over all layers (scope=global)
random     zero a seeded random `ratio` fraction per layer
n:m        in every run of m consecutive weights along the input-channel axis keep the n largest
           (2:4 is what sparse tensor cores run): Conv W[o, i, kh, kw] groups i for each (o, kh, kw);
           Gemm/MatMul group the reduction axis K.
Weights shared by several nodes are sparsified once. The report counts zeros before and after.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

_WEIGHTED = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}


class Method(enum.Enum):
    MAGNITUDE = "magnitude"
    RANDOM = "random"


class SparsityScope(enum.Enum):
    LAYER = "layer"
    GLOBAL = "global"


def reduction_axis(node: gs.Node) -> int:
    """The input-channel (reduction) axis of a node's weight."""
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return _WEIGHTED[node.op]


def n_m_mask(weights: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True where a weight survives: the n largest |w| of every m consecutive along `axis`."""
    moved = np.moveaxis(np.abs(weights), axis, -1)
    length = moved.shape[-1]
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, (-length) % m)], constant_values=-1.0)
    blocks = padded.reshape(*padded.shape[:-1], -1, m)
    order = np.argsort(-blocks, axis=-1, kind="stable")
    keep = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    keep = keep.reshape(padded.shape)[..., :length]
    return np.moveaxis(keep, -1, axis)


class Sparsify(Pass):
    """Zero the least important weights (magnitude, random or N:M)."""

    name = "sparsify"

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        method: Method = Method.MAGNITUDE
        scope: SparsityScope = SparsityScope.LAYER
        pattern: str = ""
        exclude: tuple[Regex, ...] = ()

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.pattern and not re.fullmatch(r"\d+:\d+", self.pattern):
                raise ValueError(f"pattern must look like 2:4, got {self.pattern!r}")
            if self.pattern:
                n, m = (int(v) for v in self.pattern.split(":"))
                if not 0 < n < m:
                    raise ValueError(f"pattern n:m needs 0 < n < m, got {self.pattern!r}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets = self._targets(model)
        before = sum(int(np.count_nonzero(np.asarray(w.values) == 0)) for w, _ in targets)
        masks = self._masks(targets, np.random.default_rng(ctx.seed))
        for (weight, _), mask in zip(targets, masks, strict=True):
            values = np.asarray(weight.values)
            weight.values = np.where(mask, values, np.zeros_like(values))
        after = sum(int(np.count_nonzero(np.asarray(w.values) == 0)) for w, _ in targets)
        total = sum(int(np.asarray(w.values).size) for w, _ in targets)
        return PassResult(modified=after > before, preserved=("shapes",),
                          stats={"weights_zeroed": after - before, "layers": len(targets),
                                 "sparsity": round(after / total, 4) if total else 0.0})

    def _targets(self, model: Model) -> list[tuple[gs.Constant, int]]:
        seen: set[int] = set()
        targets = []
        for node in model.graph.nodes:
            if node.op not in (*_WEIGHTED, "Gemm") or len(node.inputs) < 2:
                continue
            weight = node.inputs[1]
            if not isinstance(weight, gs.Constant) or id(weight) in seen or np.asarray(weight.values).ndim < 2:
                continue
            if any(re.search(p, node.name) for p in self.options.exclude):
                continue
            seen.add(id(weight))
            targets.append((weight, reduction_axis(node)))
        return targets

    def _masks(self, targets, rng: np.random.Generator) -> list[np.ndarray]:
        values = [np.asarray(w.values) for w, _ in targets]
        if self.options.pattern:
            n, m = (int(v) for v in self.options.pattern.split(":"))
            return [n_m_mask(v, axis, n, m) for v, (_, axis) in zip(values, targets, strict=True)]
        if self.options.method is Method.RANDOM:
            return [rng.random(v.shape) >= self.options.ratio for v in values]
        if self.options.scope is SparsityScope.GLOBAL and values:
            everything = np.concatenate([np.abs(v).reshape(-1) for v in values])
            threshold = np.quantile(everything, self.options.ratio) if self.options.ratio else -1.0
            return [np.abs(v) > threshold for v in values]
        return [_layer_mask(v, self.options.ratio) for v in values]


def _layer_mask(values: np.ndarray, ratio: float) -> np.ndarray:
    count = int(np.floor(values.size * ratio))
    keep = np.ones(values.size, dtype=bool)
    keep[np.argsort(np.abs(values).reshape(-1), kind="stable")[:count]] = False
    return keep.reshape(values.shape)
