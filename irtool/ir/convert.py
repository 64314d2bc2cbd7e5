"""Fast conversion between ONNX protos and onnx-graphsurgeon graphs.

`import_model(proto)` returns the same `gs.Graph` as `gs.import_onnx(proto)` and `export_model(graph)`
the same ModelProto, byte for byte, as `gs.export_onnx(graph, do_type_check=False)`; they only do it
with less work per node (tests/ir/test_fast_import.py holds them to that):

* tensors and nodes are created without going through their `__init__`/`__setattr__` hooks and the
  per-element bookkeeping of `SynchronizedList.extend`: the producer/consumer back-references
  graphsurgeon would add one by one are appended directly;
* outer-scope names are looked up through a chain of per-graph dicts instead of copying the whole
  outer tensor map for every subgraph (quadratic for many If/Loop nodes in a large graph);
* no debug logging per node, and the cyclic garbage collector is paused while the (acyclic-free,
  all-live) object graph is built, which otherwise rescans every object already created;
* export builds the ModelProto in place: no `make_node`/`make_graph`/`make_model` copies, the tensor
  map is walked once per graph, dtype conversions are cached.

Anything rare (functions, sparse tensors, attribute references, unusual attribute types) goes
through graphsurgeon's own code, so its behaviour, including its warnings and quirks, is kept.
"""

from __future__ import annotations

import gc
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx, update_import_domains
from onnx_graphsurgeon.importers.onnx_importer import (
    OnnxImporter,
    get_itemsize,
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
    get_onnx_tensor_type,
)
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.util.misc import SynchronizedList

# The skeleton's rule for large tensors: shape inference never needs the bytes export_model leaves out.
from irtool.ir.skeleton import SMALL_TENSOR_ELEMENTS

_A = onnx.AttributeProto
_Node, _Variable, _Constant, _Graph = gs.Node, gs.Variable, gs.Constant, gs.Graph
_new = object.__new__
_list_append = list.append
_list_extend = list.extend


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while building many long-lived objects (it would rescan them repeatedly)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------------------------------- import
def _sync_list(parent, field_name: str, items) -> SynchronizedList:
    out = list.__new__(SynchronizedList)
    out.parent_obj = parent
    out.field_name = field_name
    if items:
        _list_extend(out, items)
    return out


def _variable(name: str, dtype=None, shape=None, type: str = "tensor_type") -> gs.Variable:
    t = _new(_Variable)
    t.__dict__.update(name=name, inputs=_sync_list(t, "outputs", None), outputs=_sync_list(t, "inputs", None),
                      dtype=dtype, shape=shape, type=type)
    return t


_DTYPES: dict[int, tuple[object, int]] = {}


def _lazy_values(tensor: onnx.TensorProto) -> LazyValues:
    info = _DTYPES.get(tensor.data_type)
    if info is None:
        dtype = get_onnx_tensor_dtype(tensor)
        info = _DTYPES[tensor.data_type] = (dtype, get_itemsize(dtype))
    values = _new(LazyValues)
    shape = tensor.dims
    values.__dict__.update(tensor=tensor, shape=shape, dtype=info[0], nbytes=math.prod(shape) * info[1])
    return values


def _constant(tensor: onnx.TensorProto) -> gs.Constant:
    t = _new(_Constant)
    t.__dict__.update(name=tensor.name, inputs=_sync_list(t, "outputs", None),
                      outputs=_sync_list(t, "inputs", None), _values=_lazy_values(tensor),
                      data_location=int(tensor.data_location) if tensor.HasField("data_location") else None,
                      _export_dtype=None)
    return t


def _value_info_tensor(info: onnx.ValueInfoProto) -> gs.Variable:
    """graphsurgeon's import_tensor for a ValueInfoProto."""
    if info.type.ByteSize() > 0:
        return _variable(info.name, get_onnx_tensor_dtype(info), get_onnx_tensor_shape(info),
                         get_onnx_tensor_type(info))
    return _variable(info.name)


class _Importer:
    def __init__(self, opset, import_domains):
        self.opset = opset
        self.import_domains = import_domains

    def graph(self, g: onnx.GraphProto, outer: tuple[dict, ...], **graph_kwargs) -> gs.Graph:
        local: dict[str, gs.Tensor] = {}

        def find_outer(name):
            for scope in reversed(outer):
                if name in scope:
                    return scope[name]
            return None

        for init in g.initializer:
            if init.name not in local and find_outer(init.name) is None:
                local[init.name] = _constant(init)
        for sparse in g.sparse_initializer:
            name = sparse.values.name
            if name not in local and find_outer(name) is None:
                local[name] = OnnxImporter.import_tensor(sparse)
        for info in g.value_info:
            self._value_info(info, local, find_outer)
        initializer_names = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        inputs = [self._own(info, local) for info in g.input if info.name not in initializer_names]
        outputs = [self._own(info, local) for info in g.output]
        scopes = (*outer, local)
        self.subgraphs = False
        nodes = [self.node(n, local, find_outer, scopes) for n in g.node]
        has_subgraphs = self.subgraphs  # set by attributes() when a node holds a graph
        # Graph() walks every node for subgraph function lists; with no subgraphs that walk finds
        # nothing, so build it empty, then attach the nodes and merge only when there is something.
        graph = _Graph(nodes=[], inputs=inputs, outputs=outputs, name=g.name, doc_string=g.doc_string,
                       opset=self.opset, import_domains=self.import_domains, **graph_kwargs)
        graph.nodes = nodes
        if has_subgraphs:
            graph._merge_subgraph_functions()
        return graph

    @staticmethod
    def _value_info(info, local, find_outer) -> None:
        existing = local.get(info.name)
        if existing is not None:
            # graphsurgeon's overwrite=True: fill in what the first sighting of the name lacked.
            tensor = _value_info_tensor(info)
            if isinstance(existing, _Variable):
                existing.dtype = existing.dtype or tensor.dtype
                existing.shape = existing.shape or tensor.shape
            return
        if find_outer(info.name) is None:
            local[info.name] = _value_info_tensor(info)

    @staticmethod
    def _own(info, local) -> gs.Tensor:
        tensor = local.get(info.name)
        if tensor is None:
            tensor = local[info.name] = _value_info_tensor(info)
        return tensor

    def node(self, n: onnx.NodeProto, local: dict, find_outer, scopes: tuple[dict, ...]) -> gs.Node:
        attrs = self.attributes(n.attribute, local, scopes) if n.attribute else OrderedDict()
        inputs = []
        for name in n.input:
            tensor = local.get(name)
            if tensor is None:
                tensor = find_outer(name) if len(scopes) > 1 else None
                if tensor is None:
                    tensor = _variable("") if not name else local.setdefault(name, _variable(name))
            inputs.append(tensor)
        outputs = []
        for name in n.output:
            tensor = local.get(name)
            if tensor is None:
                tensor = _variable("") if not name else local.setdefault(name, _variable(name))
            outputs.append(tensor)
        node = _new(_Node)
        node.__dict__.update(op=n.op_type, name=n.name, attrs=attrs,
                             inputs=_sync_list(node, "outputs", inputs),
                             outputs=_sync_list(node, "inputs", outputs),
                             domain=n.domain if n.HasField("domain") else None)
        for tensor in inputs:
            _list_append(tensor.outputs, node)
        for tensor in outputs:
            _list_append(tensor.inputs, node)
        return node

    def attributes(self, protos, local: dict, scopes: tuple[dict, ...]) -> OrderedDict:
        attrs = OrderedDict()
        for a in protos:
            kind = a.type
            if a.ref_attr_name:
                kind = None
            if kind == _A.INT:
                attrs[a.name] = a.i
            elif kind == _A.INTS:
                attrs[a.name] = list(a.ints)
            elif kind == _A.FLOAT:
                attrs[a.name] = a.f
            elif kind == _A.FLOATS:
                attrs[a.name] = list(a.floats)
            elif kind == _A.STRING:
                attrs[a.name] = a.s.decode()
            elif kind == _A.STRINGS:
                attrs[a.name] = [s.decode() for s in a.strings]
            elif kind == _A.TENSOR:
                attrs[a.name] = _constant(a.t)
            elif kind == _A.GRAPH:
                attrs[a.name] = self.graph(a.g, scopes)
                self.subgraphs = True
            else:  # attribute references and types graphsurgeon skips (with its warning)
                attrs.update(OnnxImporter.import_attributes([a], {}, local, self.opset, self.import_domains))
        return attrs


def import_model(proto: onnx.ModelProto) -> gs.Graph:
    """Equivalent to `gs.import_onnx(proto)`, several times faster on large graphs."""
    opset = OnnxImporter.get_opset(proto)
    # Copies: graphsurgeon's exporter appends missing domains to this list, and the proto's own repeated
    # field would then grow in the caller's model (a pass adding com.microsoft.Gelu changed its input).
    import_domains = [onnx.helper.make_opsetid(entry.domain, entry.version)
                      for entry in OnnxImporter.get_import_domains(proto)]
    with paused_gc():
        functions = [OnnxImporter.import_function(f, model_opset=opset, model_import_domains=import_domains)
                     for f in proto.functions]
        return _Importer(opset, import_domains).graph(
            proto.graph, (), producer_name=proto.producer_name, producer_version=proto.producer_version,
            functions=functions, ir_version=proto.ir_version)


# ----------------------------------------------------------------------------------------- export
_ONNX_DTYPES: dict[object, int] = {}


def _onnx_dtype(dtype) -> int:
    found = _ONNX_DTYPES.get(dtype)
    if found is None:
        found = _ONNX_DTYPES[dtype] = dtype_to_onnx(dtype)
    return found


def _value_info(tensor: gs.Tensor, do_type_check: bool) -> onnx.ValueInfoProto:
    dtype = tensor.dtype
    if dtype is not None and (isinstance(tensor, _Constant) or tensor.type == "tensor_type"):
        return onnx.helper.make_tensor_value_info(tensor.name, _onnx_dtype(dtype), tensor.shape)
    return OnnxExporter.export_value_info_proto(tensor, do_type_check)


def _export_attributes(attrs: dict, out) -> None:
    for key, value in attrs.items():
        kind = type(value)
        if kind is int:
            a = out.add()
            a.name, a.i, a.type = key, value, _A.INT
        elif kind is float:
            a = out.add()
            a.name, a.f, a.type = key, value, _A.FLOAT
        elif kind is str:
            a = out.add()
            a.name, a.s, a.type = key, value.encode("utf-8"), _A.STRING
        elif kind is list and value and all(type(v) is int for v in value):
            a = out.add()
            a.name, a.type = key, _A.INTS
            a.ints.extend(value)
        elif kind is list and value and all(type(v) is float for v in value):
            a = out.add()
            a.name, a.type = key, _A.FLOATS
            a.floats.extend(value)
        elif isinstance(value, _Graph):
            a = out.add()
            a.name, a.type = key, _A.GRAPH
            export_graph(value, a.g, do_type_check=False)
        else:
            out.extend(OnnxExporter.export_attributes({key: value}))


def export_graph(graph: gs.Graph, out: onnx.GraphProto, do_type_check: bool = False,
                 weights: dict[str, np.ndarray] | None = None) -> None:
    """Fill `out` (empty) with graph, as graphsurgeon's OnnxExporter.export_graph would; with `weights`, see
    export_model."""
    add_node = out.node.add
    tensor_map: dict[str, gs.Tensor] = {}
    for tensor in graph.inputs:
        if tensor.name != "":
            tensor_map[tensor.name] = tensor
    for node in graph.nodes:
        proto = add_node()
        proto.op_type = node.op
        names = []
        for tensor in node.inputs:
            name = tensor.name
            names.append(name)
            if name != "":
                tensor_map[name] = tensor
        proto.input.extend(names)
        names = []
        for tensor in node.outputs:
            name = tensor.name
            names.append(name)
            if name != "":
                tensor_map[name] = tensor
        proto.output.extend(names)
        if node.name:
            proto.name = node.name
        if node.domain is not None:
            proto.domain = node.domain
        if node.attrs:
            _export_attributes(node.attrs, proto.attribute)
    for tensor in graph.outputs:
        if tensor.name != "":
            tensor_map[tensor.name] = tensor

    out.name = graph.name
    out.input.extend([_value_info(t, do_type_check) for t in graph.inputs])
    out.output.extend([_value_info(t, do_type_check) for t in graph.outputs])
    sparse = []
    for tensor in tensor_map.values():
        if isinstance(tensor, _Constant):
            if isinstance(tensor._values, SparseValues):
                sparse.append(tensor)
            else:
                kept = _kept_aside(tensor, weights) if weights is not None else None
                out.initializer.append(kept or OnnxExporter.export_tensor_proto(tensor))
    for tensor in sparse:
        out.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(tensor))
    for tensor in graph.inputs + graph.outputs:
        tensor_map.pop(tensor.name, None)
    out.value_info.extend([_value_info(t, do_type_check) for t in tensor_map.values()
                           if isinstance(t, _Variable) and (t.dtype is not None or t.shape is not None)])
    if graph.doc_string:
        out.doc_string = graph.doc_string


WEIGHTS_IN_MEMORY = "irtool-weights-in-memory"


_T = onnx.TensorProto
# Types whose numpy arrays ONNX Runtime takes as they are (bfloat16, float8, int4, strings: exported whole).
_PLAIN_TYPES = frozenset({_T.FLOAT, _T.FLOAT16, _T.DOUBLE, _T.INT8, _T.INT16, _T.INT32, _T.INT64, _T.UINT8,
                          _T.UINT16, _T.UINT32, _T.UINT64, _T.BOOL})


class DimsOnly(dict):
    """A `weights` dict for a proto that shape inference alone reads (Model.shape_inference_proto): large
    initializers are exported as external data with their dims and type, and their arrays are neither loaded
    nor kept."""


def _kept_aside(tensor: gs.Constant, weights: dict[str, np.ndarray]) -> onnx.TensorProto | None:
    """The initializer as external data with its array put in `weights`, or None to export it whole."""
    values = tensor._values
    if math.prod(values.shape) <= SMALL_TENSOR_ELEMENTS or tensor._export_dtype is not None:
        return None
    if isinstance(values, LazyValues):
        source = values.tensor
        if source.data_type not in _PLAIN_TYPES or source.data_location == _T.EXTERNAL:
            return None
        if isinstance(weights, DimsOnly):
            return _external(tensor.name, source.data_type, list(source.dims))
        values = values.load()
    if not isinstance(values, np.ndarray):
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, TypeError, ValueError):
        return None
    if data_type not in _PLAIN_TYPES:
        return None
    if isinstance(weights, DimsOnly):
        return _external(tensor.name, data_type, list(values.shape))
    weights[tensor.name] = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("="), copy=False))
    return _external(tensor.name, data_type, list(values.shape))


def _external(name: str, data_type: int, dims: list[int]) -> onnx.TensorProto:
    proto = _T(name=name, data_type=data_type, dims=dims, data_location=_T.EXTERNAL)
    entry = proto.external_data.add()
    entry.key, entry.value = "location", WEIGHTS_IN_MEMORY
    return proto


def _update_import_domains(graph: gs.Graph) -> list:
    """graphsurgeon's update_import_domains, with one cheap walk when no domain is missing."""
    if graph.import_domains is not None:
        used = set()
        stack, seen = [graph], {id(graph)}
        while stack:
            g = stack.pop()
            for node in g.nodes:
                used.add(node.domain)
                if node.attrs:
                    for value in node.attrs.values():
                        if isinstance(value, _Graph) and id(value) not in seen:
                            seen.add(id(value))
                            stack.append(value)
        used.discard(None)
        if used <= {opset.domain for opset in graph.import_domains}:
            return graph.import_domains
    return update_import_domains(graph)


def export_model(graph: gs.Graph, do_type_check: bool = False,
                 weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Equivalent to `gs.export_onnx(graph, do_type_check=...)`, without the intermediate copies.

    With a `weights` dict, the main graph's large initializers (over SMALL_TENSOR_ELEMENTS elements, plain
    numeric types) are exported without their bytes, marked as external data at WEIGHTS_IN_MEMORY, and their
    arrays go into `weights` by name: for ONNX Runtime's `add_external_initializers`, which reads them in place
    (ResNet-50: copying its 100 MB into the proto, serializing it and ONNX Runtime parsing it back took 0.6 s of
    the calibration session's 1.0 s). Such a proto is only for that: saved alone, it has no weights."""
    model = onnx.ModelProto()
    model.ir_version = onnx.IR_VERSION
    with paused_gc():
        export_graph(graph, model.graph, do_type_check, weights)
        functions = [OnnxExporter.export_function(func) for func in graph.functions]
    model.opset_import.extend(_update_import_domains(graph))
    model.functions.extend(functions)
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model
