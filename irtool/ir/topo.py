"""Iterative, stable topological sort of a graphsurgeon graph.

Kahn's algorithm over node indices; among ready nodes the one that came first in the current order
goes first, so an already sorted graph is left exactly as it is (stable and deterministic). A node
that owns subgraphs depends on the outer-scope values its subgraphs read.
"""

from __future__ import annotations

import heapq

import onnx_graphsurgeon as gs

from irtool.errors import VerificationError


def outer_uses(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node reads: its inputs plus the values its subgraphs take from outside."""
    used = [t for t in node.inputs if t.name]
    stack = [g for g in node.attrs.values() if isinstance(g, gs.Graph)]
    while stack:
        graph = stack.pop()
        local = {t.name for t in graph.inputs}
        for inner in graph.nodes:
            local.update(t.name for t in inner.outputs)
        for inner in graph.nodes:
            used.extend(t for t in inner.inputs if t.name and t.name not in local)
            stack.extend(g for g in inner.attrs.values() if isinstance(g, gs.Graph))
    return used


def live_nodes(nodes: list[gs.Node], outputs: list[gs.Tensor]) -> list[gs.Node]:
    """The nodes (in their order) that `outputs` are computed from, subgraph reads included; an explicit stack,
    not recursion, so a deep graph cannot overflow it."""
    producer = {t.name: node for node in nodes for t in node.outputs if t.name}
    live: set[int] = set()
    stack = [producer[t.name] for t in outputs if t.name in producer]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(producer[t.name] for t in outer_uses(node) if t.name in producer)
    return [node for node in nodes if id(node) in live]


def topo_order(nodes: list[gs.Node]) -> list[int]:
    """Return a stable topological order of `nodes` as indices; raise on a cycle."""
    index_of_output: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.outputs:
            if out.name:
                index_of_output[out.name] = i
    consumers: list[list[int]] = [[] for _ in nodes]
    indegree = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {index_of_output[t.name] for t in outer_uses(node) if t.name in index_of_output}
        deps.discard(i)
        indegree[i] = len(deps)
        for d in deps:
            consumers[d].append(i)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    if len(order) != len(nodes):
        stuck = sorted(nodes[i].name for i, d in enumerate(indegree) if d > 0)[:5]
        raise VerificationError(f"graph has a cycle through nodes {stuck}")
    return order


def is_topologically_sorted(nodes: list[gs.Node]) -> bool:
    """True when `topo_order(nodes)` would return the identity: no value is produced twice and every
    value a node reads (including from its subgraphs) that a node of the list produces is produced
    by an earlier node. One linear pass, much cheaper than sorting; False means "sort to know"."""
    produced: set[str] = set()
    read_early: set[str] = set()  # read before (or without) being produced
    graph_type = gs.Graph
    for node in nodes:
        uses = node.inputs
        attrs = node.attrs
        if attrs:
            for value in attrs.values():
                if isinstance(value, graph_type):
                    uses = outer_uses(node)
                    break
        for tensor in uses:
            if tensor.name not in produced:
                read_early.add(tensor.name)
        for out in node.outputs:
            name = out.name
            if name:
                if name in produced:
                    return False
                produced.add(name)
    return read_early.isdisjoint(produced)


def toposort_graph(graph: gs.Graph) -> None:
    if is_topologically_sorted(graph.nodes):
        return
    order = topo_order(graph.nodes)
    if order != list(range(len(order))):
        graph.nodes = [graph.nodes[i] for i in order]
