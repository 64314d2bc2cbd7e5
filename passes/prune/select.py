"""Which atoms to remove: per-group counts, uniform or global ranking, and MAC targets.

uniform  every unlocked group loses the same fraction of its atoms (its lowest-scored ones);
global   scores are divided by their group's mean so layers compare, and one threshold cuts
         across all groups (capped per group by max-ratio).
Counts are rounded so a group keeps a multiple of round-to channels and at least min-channels.

target-macs: MACs are bilinear in a layer's kept input and output fractions (Conv, Gemm, MatMul)
or linear in its kept channels (depthwise convs, elementwise ops, norms), so the MACs of any
candidate removal are estimated from per-node MACs of the unpruned model without rebuilding it.
A bisection on the ratio (uniform) or the threshold quantile (global) finds the smallest cut that
removes at least the target fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channels import ChannelGraph, Group

BISECTION_STEPS = 30
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Limits:
    round_to: int = 1
    min_channels: int = 1
    max_ratio: float = 0.9

    def removable(self, n: int, wanted: int) -> int:
        keep = n - max(0, min(wanted, n))
        keep = math.ceil(keep / self.round_to) * self.round_to
        keep = max(keep, self.min_channels, math.ceil(n * (1.0 - self.max_ratio) - 1e-9))
        return n - min(keep, n)


def _lowest(group: Group, scores: dict[int, float], count: int) -> list[int]:
    return sorted(group.atoms, key=lambda a: (scores[a], a))[:count]


def select_uniform(groups: list[Group], scores: dict[int, float], ratio: float, limits: Limits) -> set[int]:
    removed: set[int] = set()
    for group in groups:
        removed.update(_lowest(group, scores, limits.removable(group.size, math.floor(group.size * ratio))))
    return removed


def normalized(groups: list[Group], scores: dict[int, float]) -> dict[int, float]:
    out = {}
    for group in groups:
        mean = float(np.mean([scores[a] for a in group.atoms])) or 1.0
        out.update({a: scores[a] / mean for a in group.atoms})
    return out


def select_global(groups: list[Group], scores: dict[int, float], quantile: float, limits: Limits) -> set[int]:
    norm = normalized(groups, scores)
    if not norm or quantile <= 0:
        return set()
    threshold = float(np.quantile(np.fromiter(norm.values(), float), min(quantile, 1.0)))
    removed: set[int] = set()
    for group in groups:
        wanted = sum(1 for a in group.atoms if norm[a] < threshold)
        removed.update(_lowest(group, scores, limits.removable(group.size, wanted)))
    return removed


class MacModel:
    """MACs of the model after removing a set of atoms, estimated from per-node MACs."""

    def __init__(self, nodes: list[gs.Node], graph: ChannelGraph, macs: dict[str, int]):
        self.total = sum(macs.values())
        self.graph = graph
        self.terms: list[tuple[int, str | None, str | None]] = []
        for node in nodes:
            if macs.get(node.name):
                self.terms.append(self._term(node, macs[node.name]))

    def _term(self, node: gs.Node, macs: int) -> tuple[int, str | None, str | None]:
        spaces = self.graph.spaces
        out = node.outputs[0].name if node.outputs and node.outputs[0].name in spaces else None
        first = node.inputs[0].name if node.inputs and node.inputs[0].name in spaces else None
        if node.op in _WEIGHTED and _reduces_over_input_channels(node):
            return macs, first, out
        return macs, None, out or first

    def atoms_of(self, tensor: str) -> np.ndarray:
        return self.graph.atoms_of(tensor)

    def macs(self, removed: set[int]) -> float:
        removed_arr = np.fromiter(removed, np.int64, len(removed))
        kept: dict[str, float] = {}

        def frac(tensor: str | None) -> float:
            if tensor is None:
                return 1.0
            if tensor not in kept:
                kept[tensor] = 1.0 - float(np.isin(self.atoms_of(tensor), removed_arr).mean())
            return kept[tensor]

        return sum(m * frac(a) * frac(b) for m, a, b in self.terms)


def _reduces_over_input_channels(node: gs.Node) -> bool:
    """MACs scale with kept inputs x kept outputs, unless the op is per channel (depthwise) or its
    second operand is an activation whose channels live on a batch axis (attention's Q·Kᵀ)."""
    if node.op == "MatMul":
        return len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if int(node.attrs.get("group", 1)) == 1:
        return True
    # grouped convs lose positions in every group: MACs scale with both sides; depthwise with one
    return weight is not None and isinstance(weight, gs.Constant) and np.asarray(weight.values).shape[1] > 1


def select_for_macs(groups: list[Group], scores: dict[int, float], target: float, limits: Limits,
                    global_scope: bool, mac_model: MacModel) -> tuple[set[int], float]:
    """Smallest cut whose estimated MAC reduction reaches `target`; returns (atoms, achieved fraction)."""
    pick = select_global if global_scope else select_uniform

    def reduction(p: float) -> tuple[set[int], float]:
        removed = pick(groups, scores, p, limits)
        return removed, 1.0 - mac_model.macs(removed) / mac_model.total if mac_model.total else 0.0

    low, high = 0.0, 1.0
    best = reduction(high)
    if best[1] < target:
        return best  # the limits do not allow more; the report states what was reached
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        candidate = reduction(mid)
        if candidate[1] >= target:
            high, best = mid, candidate
        else:
            low = mid
    return best
