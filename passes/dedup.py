"""Deduplicate constants: initializers with the same dtype, shape and bytes become one.

Constants are bucketed by (dtype, shape), then by a SHA-256 of their bytes, and finally compared
byte for byte (a hash match alone never merges). Within a set of identical constants the survivor is
the first one met walking the graphs in order (main graph first, then subgraph bodies depth-first)
and each graph's nodes in topological order; readers of the others read the survivor instead. Byte
equality is the right notion for exactness: 0.0 and -0.0 stay apart, identical NaN payloads merge.

A constant that is itself a graph output keeps its place there (output names never change); only
its readers move to the survivor. Sharing a constant across an If/Loop body boundary is legal: the
exporter emits it in each graph that reads it, and inner scopes may read outer values.

A 2-D constant of SHARED_COPY_BYTES or more whose bytes are exactly the transpose of a lookup table's (a constant
a Gather reads as its data) is read through a Transpose of the table instead: torch's legacy exporter stores a
tied LM head's weight E^T beside the embedding table E (a tied GPT-2-style test model: 5.2 MB, 2.6 MB after).
ONNX Runtime folds the Transpose when it loads the model, so its outputs stay bit-identical; fold-constants
leaves such a Transpose alone (its `keep-shared`), so cleanup stays a fixed point. Only where every reader of
the copy is in the main graph and the copy is no graph output.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import replace_uses
from irtool.ir.topo import toposort_graph
from irtool.passes.fold_constants import SHARED_COPY_BYTES, lookups
from irtool.passmanager import Pass, PassContext, PassResult


class DedupInitializers(Pass):
    """Merge constants with identical dtype, shape and bytes so their readers share one."""

    name = "dedup-initializers"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged = merged_bytes = 0
        for group in duplicate_groups(constants_in_order(model)):
            survivor, duplicates = group[0], group[1:]
            for duplicate in duplicates:
                replace_uses(duplicate, survivor)
                merged += 1
                merged_bytes += _values(duplicate).nbytes
        tied = tied_bytes = 0
        for survivor, duplicate in transposed_pairs(constants_in_order(model), model.graph):
            read_through_transpose(model, duplicate, survivor)
            tied += 1
            tied_bytes += _values(duplicate).nbytes
        stats = {"initializers_merged": merged, "bytes_merged": merged_bytes,
                 "transposes_tied": tied, "bytes_tied": tied_bytes}
        return PassResult(modified=merged + tied > 0, preserved=(), stats=stats)


def constants_in_order(model: Model) -> list[gs.Constant]:
    """Every dense constant read by a node, in first-use order (the survivor order)."""
    seen: set[int] = set()
    found: list[gs.Constant] = []
    for graph in list(model.graphs()):
        toposort_graph(graph)
        for node in graph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and id(tensor) not in seen and _is_dense(tensor):
                    seen.add(id(tensor))
                    found.append(tensor)
    return found


def _is_dense(tensor: gs.Constant) -> bool:
    # Sparse initializers export as their own proto; their values are not the dense bytes.
    return type(tensor._values).__name__ != "SparseValues"


def _values(tensor: gs.Constant) -> np.ndarray:
    # np.ascontiguousarray would make 0-d arrays 1-d and merge a scalar with a [1] tensor of the same bytes.
    return np.require(tensor.values, requirements="C")


def duplicate_groups(constants: list[gs.Constant]) -> list[list[gs.Constant]]:
    """Groups (in survivor order) of two or more constants with identical dtype, shape and bytes."""
    by_layout: dict[tuple, list[gs.Constant]] = defaultdict(list)
    for tensor in constants:
        values = _values(tensor)
        by_layout[(values.dtype.str, values.shape)].append(tensor)
    groups: list[list[gs.Constant]] = []
    for candidates in by_layout.values():
        if len(candidates) > 1:
            groups.extend(_identical(candidates))
    position = {id(tensor): index for index, tensor in enumerate(constants)}
    groups.sort(key=lambda group: position[id(group[0])])
    return groups


def transposed_pairs(constants: list[gs.Constant], graph: gs.Graph,
                     min_bytes: int = SHARED_COPY_BYTES) -> list[tuple[gs.Constant, gs.Constant]]:
    """(table, duplicate) for each 2-D constant of `min_bytes` or more whose bytes are the transpose of a lookup
    table's (a constant a Gather reads as its data), duplicates read only in `graph` itself (the main graph, where
    the Transpose goes)."""
    tables = defaultdict(list)  # by the dtype and shape of their transposes
    for tensor in constants:
        values = _values(tensor)
        if values.ndim == 2 and values.nbytes >= min_bytes and lookups(tensor):
            tables[(values.dtype.str, values.shape[::-1])].append(tensor)
    main = {id(node) for node in graph.nodes}
    pairs = []
    for tensor in constants:
        values = _values(tensor)
        if values.ndim != 2 or not all(id(r) in main for r in tensor.outputs) \
                or any(out is tensor for out in graph.outputs):  # a graph output keeps its name and values
            continue
        data = None
        for table in tables.get((values.dtype.str, values.shape), []):
            data = values.tobytes() if data is None else data
            if table is not tensor and np.ascontiguousarray(_values(table).T).tobytes() == data:
                pairs.append((table, tensor))
                break
    return pairs


def read_through_transpose(model: Model, duplicate: gs.Constant, table: gs.Constant) -> None:
    """Readers of `duplicate` read Transpose(table) instead, under the duplicate's name (their inputs keep their
    names); the constant, read by nothing now, is dropped at export."""
    name = duplicate.name
    duplicate.name = model.unique_name(f"{name}_copy")
    out = gs.Variable(name, dtype=_values(table).dtype, shape=list(_values(duplicate).shape))
    node = gs.Node("Transpose", model.unique_name(f"{table.name}_transpose"), attrs={"perm": [1, 0]},
                   inputs=[table], outputs=[out])
    replace_uses(duplicate, out)
    model.graph.nodes.insert(0, node)


def _identical(candidates: list[gs.Constant]) -> list[list[gs.Constant]]:
    by_hash: dict[str, list[list[gs.Constant]]] = defaultdict(list)
    for tensor in candidates:
        data = _values(tensor).tobytes()
        buckets = by_hash[hashlib.sha256(data).hexdigest()]
        # Compare bytes too, so a hash collision can never merge different data.
        match = next((b for b in buckets if _values(b[0]).tobytes() == data), None)
        if match is None:
            buckets.append([tensor])
        else:
            match.append(tensor)
    return [group for buckets in by_hash.values() for group in buckets if len(group) > 1]
