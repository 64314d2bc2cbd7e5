"""Which atoms to remove: per-group counts, uniform or global ranking, and MAC targets.

uniform  every unlocked group loses the same fraction of its atoms (its lowest-scored ones);
global   scores are divided by their group's mean so layers compare, and one threshold cuts
         across all groups (capped per group by max-ratio).
Counts are rounded up so a group keeps a multiple of round-to channels and at least min-channels.
round-to=auto (the default) rounds only the channels a Conv reads, to multiples of 4: ONNX Runtime's CPU
provider runs a Conv in its blocked NCHWc layout only when that count is one, for a plain Conv once it reads
16 or more channels, for a grouped or depthwise Conv always (measured on single convs with onnxruntime 1.32
on AVX-512: plain convs with 3 to 15 input channels run blocked whatever the count, 18 and 182 do not, 20 and
180 do; depthwise 4, 12 and 20 do, 6, 10 and 15 do not; output counts do not matter). An unaligned layer
falls back to the plain kernel and breaks the blocked chain around it: at 50% of ResNet-50's MACs, keeping
179 channels where 180 were possible made the pruned model 1.43x faster than float instead of 1.59x.

target-macs: MACs are bilinear in a layer's kept input and output fractions (Conv, Gemm, MatMul)
or linear in its kept channels (depthwise convs, elementwise ops, norms), so the MACs of any
candidate removal are estimated from per-node MACs of the unpruned model without rebuilding it.
A bisection on the ratio (uniform) or the threshold quantile (global) finds the smallest cut that
removes at least the target fraction.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channels import ChannelGraph, Group

BISECTION_STEPS = 30
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_RECURRENT = {"LSTM", "GRU", "RNN"}


AUTO_MULTIPLE = 4  # what ONNX Runtime's NCHWc Conv needs its input channel count to be a multiple of
AUTO_FROM = 16  # input channels below which a plain Conv runs blocked anyway (MLAS's block with AVX-512)
AUTO_MIN_LAYER = 32  # narrower layers are not rounded: a step of 4 would be over 1/8 of them, too coarse to meet
# a MAC target (a 16-wide digits net went from 0.30 to 0.42 of its MACs removed), for little time to win


class Auto(enum.Enum):
    AUTO = "auto"


@dataclass(frozen=True)
class Rounding:
    """A group keeps a multiple of `step` atoms once it keeps at least `start` of them."""

    step: int = 1
    start: int = 0


@dataclass(frozen=True)
class Limits:
    min_channels: int = 1
    max_ratio: float = 0.9
    rounding: Mapping[tuple[str, ...], Rounding] = field(default_factory=dict)  # by group key

    def removable(self, group: Group, wanted: int) -> int:
        n = group.size
        keep = n - max(0, min(wanted, n))
        rounding = self.rounding.get(group.key, Rounding())
        if keep >= rounding.start:
            keep = math.ceil(keep / rounding.step) * rounding.step
        keep = max(keep, self.min_channels, math.ceil(n * (1.0 - self.max_ratio) - 1e-9))
        return n - min(keep, n)


def rounding(groups: list[Group], graph: ChannelGraph, nodes: list[gs.Node],
             round_to: int | Auto) -> dict[tuple[str, ...], Rounding]:
    """Per group, the atom step that keeps whole multiples of `round_to` channels in every tensor it spans (an
    atom can stand for several channels of a tensor: one position in every attention head); with auto, of
    AUTO_MULTIPLE channels in the tensors of AUTO_MIN_LAYER or more channels a Conv reads (see the module
    docstring)."""
    auto = round_to is Auto.AUTO
    multiple = AUTO_MULTIPLE if auto else int(round_to)
    starts = _conv_input_starts(nodes) if auto else {}
    out = {}
    for group in groups:
        tensors = [t for t in group.key if not auto or (t in starts and graph.spaces[t].size >= AUTO_MIN_LAYER)]
        if not tensors:
            continue
        # the tensor with the most elements per atom counts channels: the others hold heads or shuffle groups
        per_atom = max(_channels_per_atom(graph, t, group) for t in tensors)
        step = multiple // math.gcd(multiple, per_atom)
        if step > 1:
            start = math.ceil(min(starts[t] for t in tensors) / per_atom) if auto else 0
            out[group.key] = Rounding(step, start)
    return out


def _conv_input_starts(nodes: list[gs.Node]) -> dict[str, int]:
    """Tensors a Conv reads, with the kept channel count from which auto rounding applies to them."""
    starts: dict[str, int] = {}
    for node in nodes:
        if node.op == "Conv" and node.inputs:
            start = AUTO_FROM if int(node.attrs.get("group", 1)) == 1 else 0
            name = node.inputs[0].name
            starts[name] = min(starts.get(name, start), start)
    return starts


def _channels_per_atom(graph: ChannelGraph, tensor: str, group: Group) -> int:
    ids = graph.atoms_of(tensor)
    _, counts = np.unique(ids[np.isin(ids, group.atoms)], return_counts=True)
    return int(np.gcd.reduce(counts)) if len(counts) else 1


def _lowest(group: Group, scores: dict[int, float], count: int) -> list[int]:
    return sorted(group.atoms, key=lambda a: (scores[a], a))[:count]


def select_uniform(groups: list[Group], scores: dict[int, float], ratio: float, limits: Limits) -> set[int]:
    removed: set[int] = set()
    for group in groups:
        removed.update(_lowest(group, scores, limits.removable(group, math.floor(group.size * ratio))))
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
        removed.update(_lowest(group, scores, limits.removable(group, wanted)))
    return removed


class MacModel:
    """MACs of the model after removing a set of atoms, estimated from per-node MACs."""

    def __init__(self, nodes: list[gs.Node], graph: ChannelGraph, macs: dict[str, int]):
        self.total = sum(macs.values())
        self.graph = graph
        self.terms: list[tuple[float, str | None, str | None]] = []
        for node in nodes:
            if macs.get(node.name):
                self.terms += self._terms(node, macs[node.name])

    def _terms(self, node: gs.Node, macs: int) -> list[tuple[float, str | None, str | None]]:
        spaces = self.graph.spaces
        out = node.outputs[0].name if node.outputs and node.outputs[0].name in spaces else None
        first = node.inputs[0].name if node.inputs and node.inputs[0].name in spaces else None
        if node.op in _RECURRENT and all(isinstance(t, gs.Constant) for t in node.inputs[1:3]):
            # input x W: bilinear in inputs and units; state x R: in units twice
            inputs, units = (np.asarray(node.inputs[i].values).shape[2] for i in (1, 2))
            share = inputs / (inputs + units)
            return [(macs * share, first, out), (macs * (1 - share), out, out)]
        if node.op in _WEIGHTED and _reduces_over_input_channels(node):
            return [(macs, first, out)]
        return [(macs, None, out or first)]

    def atoms_of(self, tensor: str) -> np.ndarray:
        return self.graph.atoms_of(tensor)

    def macs(self, removed: set[int]) -> float:
        mask = self.graph.removed_mask(removed)
        kept: dict[str, float] = {}

        def frac(tensor: str | None) -> float:
            if tensor is None:
                return 1.0
            if tensor not in kept:
                kept[tensor] = 1.0 - float(mask[self.atoms_of(tensor)].mean())
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

    def reduction(removed: set[int]) -> float:
        return 1.0 - mac_model.macs(removed) / mac_model.total if mac_model.total else 0.0

    low, high = 0.0, 1.0
    below, above = set(), pick(groups, scores, high, limits)
    if reduction(above) < target:
        return above, reduction(above)  # the limits do not allow more; the report states what was reached
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        candidate = pick(groups, scores, mid, limits)
        if reduction(candidate) >= target:
            high, above = mid, candidate
        else:
            low, below = mid, candidate
    return _between(groups, scores, below, above, target, reduction)


def _between(groups: list[Group], scores: dict[int, float], below: set[int], above: set[int], target: float,
             reduction) -> tuple[set[int], float]:
    """Rounded counts step together at one ratio: with round-to=8 on 64-channel convs, the first ratio that
    reaches a 0.5 target removes 0.59 of the MACs (tests/prune/test_prune_rounding.py). From the cut just below
    the target, take the larger cut one group at a time, the group whose extra atoms score lowest first, until
    the target is reached (0.52 there). Scores are divided by their group's mean, so layers compare."""
    changed = [g for g in groups if any((a in above) != (a in below) for a in g.atoms)]
    norm = normalized(changed, scores)

    def extra_score(group: Group) -> float:
        return float(np.mean([norm[a] for a in group.atoms if a in above and a not in below] or [0.0]))

    removed = set(below)
    for group in sorted(changed, key=lambda g: (extra_score(g), g.atoms[0])):
        atoms = set(group.atoms)
        removed = (removed - atoms) | (above & atoms)
        achieved = reduction(removed)
        if achieved >= target:
            return removed, achieved
    return above, reduction(above)
