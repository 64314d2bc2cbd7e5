"""Dead-code elimination: remove nodes none of whose outputs reach a graph output, and the
initializers only they used.

A node is live if one of its outputs is a graph output or is read by a live node, including reads
from inside a live node's subgraphs. Walking backwards from the outputs with an explicit stack keeps
this linear in the number of nodes and free of recursion limits. Subgraph bodies are cleaned the
same way, with their own outputs as roots.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.topo import live_nodes
from irtool.passmanager import Pass, PassContext, PassResult


class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and unused initializers."""

    name = "dce"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = sum(remove_dead_nodes(graph) for graph in list(model.graphs()))
        return PassResult(modified=removed > 0, preserved=(), stats={"nodes_removed": removed})


def remove_dead_nodes(graph: gs.Graph) -> int:
    live = {id(node) for node in live_nodes(graph.nodes, graph.outputs)}
    dead = [node for node in graph.nodes if id(node) not in live]
    if not dead:
        return 0
    for node in dead:
        # Detach so the tensors' producer/consumer lists no longer mention the removed node.
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [node for node in graph.nodes if id(node) in live]
    return len(dead)
