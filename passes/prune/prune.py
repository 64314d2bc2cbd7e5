"""Structured channel pruning: physically remove the least important coupled channels.

The `channel-groups` analysis partitions channels into atoms (one channel everywhere it flows) and
groups (a layer's interchangeable atoms). The pass scores atoms (passes/prune/importance.py), picks
the ones to remove per group or globally, by ratio or by a MAC target (passes/prune/select.py), lets
each op's channel handler slice its weights, biases, norm parameters and attributes, and optionally
recovers accuracy without training (passes/prune/recover.py). Graph outputs never change shape. The pass first
folds constant arithmetic (fold-constants, dce), which exporters leave computing split sizes, reshape targets and
pads at run time, so that `prune` alone finds what `cleanup,prune` does.

Contract (the masking oracle, with recover=none): the pruned model's outputs equal the original
model's outputs after zeroing, in every consumer, the input-channel weights of the removed channels.
Channels a LayerNormalization or RMSNormalization normalizes over, or a reduction averages over (a LayerNorm
written out), stay unless through-norms=true; with it they go too, and the contract is the masking oracle in which
each such norm or reduction covers the kept channels only (tests/prune/test_prune_through_norms.py).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.channel_handlers import HANDLERS
from irtool.analysis.channels import ChannelGraph, ChannelGroups, Group, PruneView
from irtool.analysis.cost import macs_by_node
from irtool.analysis.shapes import Shapes, concrete_input_shapes
from irtool.ir.model import Model
from irtool.ir.topo import toposort_graph
from irtool.passes.dce import DeadCodeElimination
from irtool.passes.dedup import constants_in_order, read_through_transpose, transposed_pairs
from irtool.passes.fold_constants import SHARED_COPY_BYTES, FoldConstants, lookups, may_fold
from irtool.passes.prune.importance import Importance, atom_scores
from irtool.passes.prune.recover import Recover, recover
from irtool.passes.prune.select import Auto, Limits, MacModel, rounding, select_for_macs, select_global, select_uniform
from irtool.passes.quant.placement import refuse_quantized
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

log = logging.getLogger(__name__)


class Scope(enum.Enum):
    UNIFORM = "uniform"
    GLOBAL = "global"


@dataclass
class PrunePlan:
    """Atoms to remove and, per group, what was removed (for the report and the oracle)."""

    removed_atoms: set[int]
    groups: list[dict]
    estimated_mac_reduction: float | None = None
    constants_folded: int = 0

    def removed_indices(self, graph: ChannelGraph) -> dict[str, list[int]]:
        out = {}
        removed = graph.removed_mask(self.removed_atoms)
        for name in graph.spaces:
            gone = np.flatnonzero(removed[graph.atoms_of(name)]).tolist()
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
        target_macs: float | None = None
        scope: Scope = Scope.UNIFORM
        max_ratio: float = 0.9
        round_to: int | Auto = Auto.AUTO
        min_channels: int = 1
        importance: Importance = Importance.L2
        exclude: tuple[Regex, ...] = ()
        recover: Recover = Recover.NONE
        through_norms: bool = False

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
                raise ValueError(f"target-macs must be in (0, 1), got {self.target_macs}")
            if not 0.0 < self.max_ratio < 1.0:
                raise ValueError(f"max-ratio must be in (0, 1), got {self.max_ratio}")
            if (self.round_to is not Auto.AUTO and self.round_to < 1) or self.min_channels < 1:
                raise ValueError("round-to and min-channels must be at least 1")

    def plan(self, model: Model, ctx: PassContext) -> PrunePlan:
        """What to remove; first folds the model's constant shape arithmetic (see _fold_shape_arithmetic)."""
        # its weights are DequantizeLinear outputs, not constants: every group would lock, and the pass said only
        # "0 of 0 channel groups are locked"
        refuse_quantized(model, "prune", "prune the float model, then quantize it (--passes prune,quant)")
        folded = _fold_shape_arithmetic(model, ctx)
        graph = ctx.analysis(ChannelGroups, model)
        groups = [g for g in graph.groups if self._free(g) and not self._excluded(g)]
        scores = atom_scores(self.options.importance, model, graph, groups, ctx)
        limits = Limits(self.options.min_channels, self.options.max_ratio,
                        rounding(groups, graph, model.graph.nodes, self.options.round_to))
        estimate = None
        if self.options.target_macs is not None:
            macs = MacModel(model.graph.nodes, graph, _macs(model, ctx))
            removed, estimate = select_for_macs(groups, scores, self.options.target_macs, limits,
                                                self.options.scope is Scope.GLOBAL, macs)
        elif self.options.scope is Scope.GLOBAL:
            removed = select_global(groups, scores, self.options.ratio, limits)
        else:
            removed = select_uniform(groups, scores, self.options.ratio, limits)
        return PrunePlan(removed, _group_report(groups, removed), estimate, folded)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        tied = tied_transposes(model)
        plan = self.plan(model, ctx)
        graph = ctx.analysis(ChannelGroups, model)
        macs_before = sum(_macs(model, ctx).values())
        folded = {"constants_folded": plan.constants_folded} if plan.constants_folded else {}
        if not plan.removed_atoms:
            if self.options.ratio > 0 or self.options.target_macs is not None:
                _say_why_nothing_went(graph, self.options.through_norms)
            tie_again(model, tied)
            return PassResult(modified=bool(folded), stats={"channels_removed": 0, "groups_pruned": 0, **folded})
        reference = model.copy() if self.options.recover is not Recover.NONE else None
        view = PruneView(graph, plan.removed_atoms, {t.name for t in model.graph.outputs}, model.unique_name)
        for node in model.graph.nodes:
            if node.op in HANDLERS:
                HANDLERS[node.op].apply(node, view)
        if view.new_nodes:
            model.graph.nodes.extend(view.new_nodes)
            toposort_graph(model.graph)
        _forget_inner_shapes(model.graph)
        stats = {"channels_removed": sum(g["before"] - g["after"] for g in plan.groups),
                 "groups_pruned": len(plan.groups), "macs_before": macs_before, **folded}
        if reference is not None:
            stats["recovered_layers"] = recover(self.options.recover, reference, model, plan.removed_indices(graph),
                                                ctx)
        if plan.estimated_mac_reduction is not None:
            stats["estimated_mac_reduction"] = round(plan.estimated_mac_reduction, 4)
        stats["groups"] = plan.groups
        tie_again(model, tied)
        return PassResult(modified=True, stats=stats)

    def _free(self, group: Group) -> bool:
        return group.locked is None or (group.soft and self.options.through_norms)

    def _excluded(self, group: Group) -> bool:
        names = _producers(group)
        return any(re.search(p, n) for p in self.options.exclude for n in names)


def tied_transposes(model: Model) -> set[str]:
    """A tied LM head's weight, as the names of the large lookup tables' transposes: the outputs of Transposes of
    them (torch.export's form, which cleanup keeps and prune's fold turns into copies of the table) and constants
    holding them (the legacy exporter's form)."""
    computed = {node.outputs[0].name for node in model.graph.nodes
                if node.op == "Transpose" and isinstance(node.inputs[0], gs.Constant) and lookups(node.inputs[0])
                and node.inputs[0].values.nbytes >= SHARED_COPY_BYTES}
    return computed | {copy.name for _, copy in transposed_pairs(constants_in_order(model), model.graph)}


def tie_again(model: Model, tied: set[str]) -> None:
    """Read those (sliced) copies through a Transpose of the (sliced) table, so a pruned tied LM stores its table
    once (the tied test LM at ratio 0.5: 1.3 MB, two copies and 2.6 MB before)."""
    if tied:
        for table, copy in transposed_pairs(constants_in_order(model), model.graph, min_bytes=0):
            if copy.name in tied:
                read_through_transpose(model, copy, table)


def _fold_shape_arithmetic(model: Model, ctx: PassContext) -> int:
    """Fold constant subexpressions (fold-constants, then dce); returns the nodes folded. torch's legacy exporter
    computes split sizes, reshape targets and pads from Shape at run time, and a channel a Shape reads or a
    computed operand shapes stays locked: at ratio 0.5 without cleanup first, its YOLO lost 656 channels instead
    of 912 and ShuffleNetV2 168 instead of 210 (`--passes prune,quant`). Folding runs without the context's
    input shapes, so it never specializes the model to them as `cleanup` with --input-shape does. A tied LM head's
    Transpose of the embedding table, which `cleanup` keeps, is folded too (keep_shared=False): the channel analysis
    reads a layer's weight as a constant, and with the Transpose left the tied test LM lost no channel; `run` ties
    the two sliced copies again at its end (`tie_again`)."""
    if not may_fold(model):
        return 0
    unshaped = dataclasses.replace(ctx, input_shapes={}, _analyses={})
    result = FoldConstants(FoldConstants.Options(keep_shared=False)).run(model, unshaped)
    if not result.modified:
        return 0
    DeadCodeElimination().run(model, unshaped)
    ctx.invalidate()
    return int(result.stats["nodes_folded"])


def _say_why_nothing_went(graph: ChannelGraph, through_norms: bool) -> None:
    """A warning naming the commonest lock reasons, when prune was asked to remove channels and removed none."""
    reasons: dict[str, int] = {}
    for group in graph.groups:
        if group.locked is not None:
            reasons[group.locked] = reasons.get(group.locked, 0) + 1
    free = len(graph.groups) - sum(reasons.values())
    common = sorted(reasons, key=lambda r: (-reasons[r], r))[:3]
    small = f"; the {free} other group(s) are excluded or too small for the ratio" if free else ""
    if not through_norms and any(g.soft for g in graph.groups):
        small += "; through-norms=true also removes channels a LayerNormalization normalizes over"
    log.warning("prune removed no channels: %d of %d channel groups are locked (%s)%s", len(graph.groups) - free,
                len(graph.groups), "; ".join(common) or "none", small)


def _macs(model: Model, ctx: PassContext) -> dict[str, int]:
    """MACs per node and sample: symbolic dims (a dynamic batch) count as 1 unless the user fixed them."""
    macs = macs_by_node(model, ctx.analysis(Shapes, model))
    if any(value is None for value in macs.values()):
        concrete = PassContext(input_shapes=concrete_input_shapes(model, ctx.input_shapes))
        macs = macs_by_node(model, concrete.analysis(Shapes, model))
    return {name: value or 0 for name, value in macs.items()}


def _producers(group: Group) -> list[str]:
    return sorted({f.node for fs in group.filters.values() for f in fs})


def _group_report(groups: list[Group], removed: set[int]) -> list[dict]:
    report = []
    for group in groups:
        gone = sum(1 for a in group.atoms if a in removed)
        if gone:
            report.append({"producers": _producers(group), "before": group.size, "after": group.size - gone})
    return report


def _forget_inner_shapes(graph: gs.Graph) -> None:
    """Shapes recorded before pruning are stale; the verifier and exporters re-infer them."""
    boundary = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
