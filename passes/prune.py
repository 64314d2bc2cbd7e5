"""Structured channel pruning: physically remove the least important coupled channels.

The `channel-groups` analysis partitions channels into atoms (one channel everywhere it flows) and
groups (a layer's interchangeable atoms). For each unlocked group this pass ranks atoms by the norm
of the producer filters that write them (L1: Σ|w|, L2: sqrt(Σw²) over every filter of the atom, so a
residual channel written by three convs is judged by all three), removes the lowest `ratio` of them
(keeping a multiple of `round-to` and at least `min-channels`), then lets each op's channel handler
slice its weights, biases, norm parameters and attributes. Graph outputs never change shape.

Contract (the masking oracle): the pruned model's outputs equal the original model's outputs after
zeroing, in every consumer, the input-channel weights of the removed channels.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channels import ChannelGraph, ChannelGroups, Group, PruneView
from irtool.ir.model import Model
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex


class Importance(enum.Enum):
    L1 = "l1"
    L2 = "l2"
    RANDOM = "random"


@dataclass
class PrunePlan:
    """Atoms to remove and, per group, what was removed (for the report and the oracle)."""

    removed_atoms: set[int]
    groups: list[dict]

    def removed_indices(self, graph: ChannelGraph) -> dict[str, list[int]]:
        out = {}
        for name, space in graph.spaces.items():
            gone = [i for i in range(space.size) if graph.atom(name, i) in self.removed_atoms]
            if gone:
                out[name] = gone
        return out


class PruneChannels(Pass):
    """Remove the least important coupled channel groups."""

    name = "prune"
    requires = (ChannelGroups,)

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        round_to: int = 1
        min_channels: int = 1
        importance: Importance = Importance.L2
        exclude: tuple[Regex, ...] = ()

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.round_to < 1 or self.min_channels < 1:
                raise ValueError("round-to and min-channels must be at least 1")

    def plan(self, model: Model, ctx: PassContext) -> PrunePlan:
        graph = ctx.analysis(ChannelGroups, model)
        rng = np.random.default_rng(ctx.seed)
        removed: set[int] = set()
        report = []
        for group in graph.groups:
            if group.locked is not None or self._excluded(group):
                continue
            victims = self._victims(group, rng)
            if victims:
                removed.update(victims)
                report.append({"producers": _producers(group), "before": group.size,
                               "after": group.size - len(victims)})
        return PrunePlan(removed, report)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = ctx.analysis(ChannelGroups, model)
        plan = self.plan(model, ctx)
        if not plan.removed_atoms:
            return PassResult(modified=False, stats={"channels_removed": 0, "groups_pruned": 0})
        from irtool.analysis.channel_handlers import HANDLERS

        view = PruneView(graph, plan.removed_atoms)
        for node in model.graph.nodes:
            if node.op in HANDLERS:
                HANDLERS[node.op].apply(node, view)
        _forget_inner_shapes(model.graph)
        removed = sum(g["before"] - g["after"] for g in plan.groups)
        return PassResult(modified=True, stats={"channels_removed": removed, "groups_pruned": len(plan.groups),
                                                "groups": plan.groups})

    def _excluded(self, group: Group) -> bool:
        names = _producers(group)
        return any(re.search(p, n) for p in self.options.exclude for n in names)

    def _victims(self, group: Group, rng: np.random.Generator) -> list[int]:
        n = group.size
        keep = n - math.floor(n * self.options.ratio)
        keep = min(n, max(self.options.min_channels, math.ceil(keep / self.options.round_to) * self.options.round_to))
        if keep >= n:
            return []
        scores = self._scores(group, rng)
        order = sorted(range(n), key=lambda i: (scores[i], i))
        return [group.atoms[i] for i in order[: n - keep]]

    def _scores(self, group: Group, rng: np.random.Generator) -> list[float]:
        if self.options.importance is Importance.RANDOM:
            return list(rng.random(group.size))
        p = 1 if self.options.importance is Importance.L1 else 2
        scores = []
        for atom in group.atoms:
            total = sum(float(np.sum(np.abs(f.weights) ** p)) for f in group.filters[atom])
            scores.append(total if p == 1 else math.sqrt(total))
        return scores


def _producers(group: Group) -> list[str]:
    return sorted({f.node for fs in group.filters.values() for f in fs})


def _forget_inner_shapes(graph: gs.Graph) -> None:
    """Shapes recorded before pruning are stale; the verifier and exporters re-infer them."""
    boundary = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
