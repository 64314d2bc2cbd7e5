"""The IR: a mutable Model over onnx-graphsurgeon.

`Model` holds the main `gs.Graph` (If/Loop/Scan bodies are `gs.Graph` attributes of their nodes, so
subgraphs travel with it) plus what graphsurgeon drops: metadata properties, model version, domain
and doc string. Passes edit `model.graph` with graphsurgeon's API; the core keeps the invariants:
every node has a unique name, and `to_proto()` emits nodes in topological order using an iterative
sort (graphsurgeon's own toposort recurses and fails on long chains, see DESIGN.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from irtool.ir import io
from irtool.ir.convert import DimsOnly, export_model, import_model, paused_gc
from irtool.ir.topo import toposort_graph

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# graphsurgeon logs every imported node at debug level; formatting those messages costs ~7 us a node.
G_LOGGER.severity = G_LOGGER.ERROR


class Model:
    """An ONNX model as a graphsurgeon graph plus the model-level fields graphsurgeon does not keep."""

    def __init__(self, graph: gs.Graph, *, metadata: dict[str, str] | None = None, model_version: int = 0,
                 domain: str = "", doc_string: str = "", source: str | None = None,
                 source_opset: int | None = None):
        self.graph = graph
        # The default-domain opset of the file or proto loaded, before any upgrade to io.MIN_OPSET.
        self.source_opset = source_opset if source_opset is not None else int(graph.opset)
        self.metadata = dict(metadata or {})
        self.model_version = model_version
        self.domain = domain
        self.doc_string = doc_string
        self.source = source
        # Float weights a rounding pass (gptq) replaced, by node name: (constant name, values). In memory only, so
        # insert-qdq can give layers it leaves float their weights back within one pipeline run.
        self.float_weights: dict[str, tuple[str, np.ndarray]] = {}
        self._taken: set[str] | None = None
        if graph.ir_version is None:
            graph.ir_version = onnx.helper.find_min_ir_version_for(  # custom domains have no IR version
                [onnx.helper.make_opsetid(d, v) for d, v in self.opset_imports.items()], ignore_unknown=True)
        name_unnamed_nodes(self)

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        """Load an .onnx file safely (see irtool.ir.io); raises InputError on anything unusable."""
        proto = io.read_model_proto(path)
        return cls.from_proto(proto, source=str(path), checked=True, owned=True)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, source: str | None = None, checked: bool = False,
                   owned: bool = False) -> Model:
        """`owned`: the caller drops `proto` after this, so an opset upgrade may take its tensors."""
        if not checked:
            io.check_is_model(proto, source or "<model>")
        source_opset = io.default_opset(proto)
        if source_opset < io.MIN_OPSET:
            proto = io.upgrade_opset(proto, source or "<model>", keep_input=not owned)
        graph = import_model(proto)  # same graph as gs.import_onnx, built faster (irtool.ir.convert)
        graph.ir_version = proto.ir_version or None
        return cls(graph, metadata={p.key: p.value for p in proto.metadata_props},
                   model_version=proto.model_version, domain=proto.domain, doc_string=proto.doc_string,
                   source=source, source_opset=source_opset)

    def copy(self) -> Model:
        clone = Model.from_proto(self.to_proto(), source=self.source, checked=True)
        clone.source_opset = self.source_opset
        clone.float_weights = dict(self.float_weights)
        return clone

    # ----------------------------------------------------------------- export
    def to_proto(self, weights: dict | None = None) -> onnx.ModelProto:
        """Export to a ModelProto, nodes in topological order, unused tensors kept as they are. With a
        `weights` dict, large weights stay out of the proto (irtool.ir.convert.export_model): only for an
        ONNX Runtime session given them with `add_external_initializers`."""
        with paused_gc():  # see irtool.ir.convert.paused_gc: large graphs make every GC pass expensive
            for graph in self.graphs():
                toposort_graph(graph)
            proto = export_model(self.graph, do_type_check=False, weights=weights)  # == gs.export_onnx, fewer copies
        proto.model_version = self.model_version
        proto.domain = self.domain
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for key in sorted(self.metadata):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, self.metadata[key]
        return proto

    def shape_inference_proto(self) -> onnx.ModelProto:
        """A ModelProto for shape inference alone: large weights carry their dims and types, not their values,
        which are neither copied nor loaded (convert.DimsOnly). Exporting ResNet-50/224's weights whole cost a
        third of the channel analysis."""
        return self.to_proto(DimsOnly())

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None,
             proto: onnx.ModelProto | None = None) -> None:
        """Atomic save; refuses to overwrite the file this model was loaded from.

        `proto` may pass a ModelProto just made by `to_proto()` (e.g. one already verified) to save it
        without exporting again.
        """
        if self.source and Path(self.source).exists() and Path(path).exists() \
                and Path(path).resolve() == Path(self.source).resolve():
            from irtool.errors import InputError
            raise InputError(f"{path}: refusing to overwrite the input model; choose another output path")
        proto = proto if proto is not None else self.to_proto()
        # io decides by tensor bytes (dims x itemsize, no copy); proto.ByteSize() would serialize the
        # whole model under upb and raise EncodeError past 2 GiB.
        io.write_model_proto(proto, path, external_data=external_data)

    # ----------------------------------------------------------------- queries
    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    @property
    def opset_imports(self) -> dict[str, int]:
        imports = {"": int(self.graph.opset)}
        for entry in self.graph.import_domains or []:
            if entry.domain not in ("", "ai.onnx"):
                imports[entry.domain] = entry.version
        return imports

    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph, then every nested subgraph (depth-first, iterative)."""
        stack = [self.graph]
        while stack:
            graph = stack.pop()
            yield graph
            found = [sub for node in graph.nodes if node.attrs
                     for sub in node.attrs.values() if isinstance(sub, gs.Graph)]
            stack.extend(reversed(found))

    def nodes(self) -> Iterator[gs.Node]:
        for graph in self.graphs():
            yield from graph.nodes

    def unique_name(self, prefix: str) -> str:
        """A node/tensor name not yet used anywhere in the model, deterministic for a given model.

        The set of taken names is collected once and then kept up to date with the names handed out
        here (collecting it per call made passes that add many values quadratic); the pass manager
        forgets it before every pass, so within a pass new names must come from this method."""
        if self._taken is None:
            self._taken = self._names()
        name, index = prefix, 0
        while name in self._taken:
            index += 1
            name = f"{prefix}_{index}"
        self._taken.add(name)
        return name

    def reuse_name(self, name: str) -> str:
        """`name` itself if nothing in the model uses it now (a pass restoring what it removed earlier gives it
        back its old name), else a unique name from it."""
        if name in self._names():
            return self.unique_name(name)
        if self._taken is None:
            self._taken = self._names()
        self._taken.add(name)
        return name

    def forget_names(self) -> None:
        self._taken = None

    def _names(self) -> set[str]:
        names: set[str] = set()
        for graph in self.graphs():
            names.update(node.name for node in graph.nodes)
            names.update(graph.tensors().keys())
        return names

    def __repr__(self) -> str:
        return f"Model(nodes={len(self.graph.nodes)}, opset={self.opset}, source={self.source!r})"


def subgraphs_of(node: gs.Node) -> Iterator[gs.Graph]:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value


def name_unnamed_nodes(model: Model) -> None:
    """Give nameless nodes a deterministic `<op>_<n>` name, and a node whose name an earlier node holds
    `<name>_<n>`, so names identify nodes everywhere (ONNX Runtime refuses a model with two nodes of one name,
    which some exporters and hand edits write)."""
    nodes = list(model.nodes())
    names = [node.name for node in nodes]
    if all(names) and len(set(names)) == len(names):
        return  # every node is named once: the common case, one pass
    used = {name for name in names if name}
    seen: set[str] = set()
    counters: dict[str, int] = {}
    duplicates: list[str] = []
    for node in nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        if node.name:
            duplicates.append(node.name)
        prefix = node.name or node.op
        index = counters.get(prefix, 1 if node.name else 0)
        while f"{prefix}_{index}" in used:
            index += 1
        node.name = f"{prefix}_{index}"
        used.add(node.name)
        seen.add(node.name)
        counters[prefix] = index + 1
    if duplicates:
        log.warning("%d node(s) named like an earlier node (%r first) were renamed <name>_<n>", len(duplicates),
                    duplicates[0])
