"""Layer pruning: remove whole residual branches, x + f(x) -> x.

A candidate is an Add whose inputs are a value x and the output of a branch f that reads only x
(and constants), whose nodes feed nothing outside the branch, and whose output has x's shape, so
that dropping f leaves a valid graph with the same output shapes. Each candidate is scored by how
much removing it alone changes the model's outputs on calibration data (mean squared error relative
to the outputs' mean square); the least harmful are dropped, `count` of them or as many as needed
to remove `target-macs` of the MACs. Scores are computed once, before any removal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.analysis.cost import model_cost
from irtool.analysis.shapes import Shapes, concrete_input_shapes
from irtool.calibration.tap import detached, tap
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.rewrite import is_graph_output, remove_nodes, replace_uses
from irtool.passmanager import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass
class Branch:
    add: str
    out: str  # the branch's result, the Add input that is not the skip value
    nodes: list[str]
    macs: int = 0
    damage: float = 0.0


def find_branches(model: Model, shapes) -> list[Branch]:
    nodes = model.graph.nodes
    found = []
    for add in nodes:
        if add.op != "Add" or len(add.inputs) != 2 or is_graph_output(model.graph, add.outputs[0]):
            continue
        for skip, branch_out in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            members = _branch(skip, branch_out, add)
            if members and shapes.shape(skip.name) == shapes.shape(add.outputs[0].name) is not None:
                found.append(Branch(add.name, branch_out.name, [n.name for n in members]))
                break
    return found


def _branch(skip: gs.Tensor, out: gs.Tensor, add: gs.Node) -> list[gs.Node] | None:
    """Nodes computing `out` from `skip` alone, used only inside the branch; None if not a branch."""
    if isinstance(out, gs.Constant) or not out.inputs:
        return None
    members: dict[int, gs.Node] = {}
    stack = [out.inputs[0]]
    while stack:
        node = stack.pop()
        if id(node) in members:
            continue
        members[id(node)] = node
        for t in node.inputs:
            if t is skip or isinstance(t, gs.Constant) or not t.name:
                continue
            if not t.inputs:
                return None  # reads a graph input other than the skip value
            stack.append(t.inputs[0])
        if len(members) > 10_000:
            return None
    allowed = set(members) | {id(add)}
    for node in members.values():
        if any(any(id(c) not in allowed for c in t.outputs) for t in node.outputs):
            return None
    return list(members.values())


class DropBlocks(Pass):
    """Remove the residual branches whose removal changes the outputs least."""

    name = "drop-blocks"
    requires = (Shapes,)

    @dataclass(frozen=True)
    class Options:
        count: int = 1
        target_macs: float | None = None

        def __post_init__(self):
            if self.count < 0:
                raise ValueError("count must be >= 0")
            if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
                raise ValueError(f"target-macs must be in (0, 1), got {self.target_macs}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise InputError("drop-blocks needs calibration data (--calib-data or calibration_data=)")
        branches = find_branches(model, ctx.analysis(Shapes, model))
        if not branches:
            return PassResult(modified=False, stats={"blocks_dropped": 0, "candidates": 0})
        self._score(model, branches, ctx)
        chosen = self._choose(model, branches, ctx)
        for branch in chosen:
            drop(model, branch)
        return PassResult(modified=bool(chosen), stats={
            "blocks_dropped": len(chosen), "candidates": len(branches),
            "dropped": [{"add": b.add, "nodes": len(b.nodes), "damage": round(b.damage, 6)} for b in chosen]})

    def _score(self, model: Model, branches: list[Branch], ctx: PassContext) -> None:
        outputs = [t.name for t in model.graph.outputs]
        reference = [detached(values) for values in tap(model, outputs, ctx.calibration_data())]
        cost = model_cost(model, concrete_input_shapes(model, ctx.input_shapes))
        costs = {n.name: n.macs or 0 for n in cost.per_node}
        for index, branch in enumerate(branches):
            ctx.logger.info("drop-blocks: scoring candidate %d/%d (%s)", index + 1, len(branches), branch.add)
            trial = model.copy()
            drop(trial, branch)
            branch.macs = sum(costs.get(n, 0) for n in branch.nodes)
            branch.damage = _damage(reference, tap(trial, outputs, ctx.calibration_data()))

    def _choose(self, model: Model, branches: list[Branch], ctx: PassContext) -> list[Branch]:
        ranked = sorted(branches, key=lambda b: (b.damage, b.add))
        if self.options.target_macs is None:
            return ranked[: self.options.count]
        total = model_cost(model, concrete_input_shapes(model, ctx.input_shapes)).total_macs or 1
        chosen, removed = [], 0
        for branch in ranked:
            if removed / total >= self.options.target_macs:
                break
            chosen.append(branch)
            removed += branch.macs
        return chosen


def _damage(reference: list[dict], trial) -> float:
    err = power = 0.0
    for ref, out in zip(reference, trial, strict=True):
        for name, value in ref.items():
            err += float(np.mean((value.astype(np.float64) - out[name]) ** 2))
            power += float(np.mean(value.astype(np.float64) ** 2))
    return err / power if power else err


def drop(model: Model, branch: Branch) -> None:
    """Replace the Add by its skip input and delete the branch."""
    nodes = {n.name: n for n in model.graph.nodes}
    add = nodes[branch.add]
    # Earlier drops may have renamed the skip value, so find it as the input that is not the branch.
    skip = next(t for t in add.inputs if t.name != branch.out)
    replace_uses(add.outputs[0], skip)
    remove_nodes(model.graph, [add, *(nodes[n] for n in branch.nodes)])
