"""A weight-free view of a model for the checker and shape inference.

onnx.checker and onnx.shape_inference serialize the whole ModelProto, weights included, several
times over. Neither needs the bytes of large initializers, only their types and shapes, so the
skeleton turns every large initializer into a graph input of the same type and shape and keeps small
ones (shape constants for Reshape, Slice starts, ...) whose values inference reads. Large tensors
are checked separately: their byte count must match dims x element size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import onnx
from onnx import helper
from onnx.onnx_cpp2py_export import shape_inference as c_shape_inference

log = logging.getLogger(__name__)

SMALL_TENSOR_ELEMENTS = 1024
MANY_INITIALIZERS = 4096
FULL_SERIALIZE_BYTES = 64 << 20


def _elements(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)  # 1 for a scalar


_MODEL_SCALARS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_MODEL_KEPT = {*_MODEL_SCALARS, "opset_import", "functions", "graph"}
_GRAPH_KEPT = {"name", "node", "input", "output", "value_info", "sparse_initializer", "initializer"}


def _is_large(tensor: onnx.TensorProto) -> bool:
    return _elements(tensor) > SMALL_TENSOR_ELEMENTS and tensor.data_type != onnx.TensorProto.STRING


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of proto without large initializer data (they become typed graph inputs)."""
    out = onnx.ModelProto()
    src = proto.graph
    if not any(_is_large(tensor) for tensor in src.initializer):
        # Nothing to leave out: one C-level copy instead of copying node by node, minus the fields
        # the skeleton never carries.
        out.CopyFrom(proto)
        for message, kept in ((out, _MODEL_KEPT), (out.graph, _GRAPH_KEPT)):
            for field in message.DESCRIPTOR.fields:
                if field.name not in kept:
                    message.ClearField(field.name)
        for field in _MODEL_SCALARS:
            setattr(out, field, getattr(proto, field))
        out.graph.name = src.name
        return out
    for field in _MODEL_SCALARS:
        setattr(out, field, getattr(proto, field))
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    dst = out.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    dst.sparse_initializer.extend(src.sparse_initializer)
    input_names = {i.name for i in src.input}
    for tensor in src.initializer:
        if not _is_large(tensor):
            dst.initializer.append(tensor)
        elif tensor.name not in input_names:
            dst.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return out


def check_model(proto: onnx.ModelProto) -> None:
    """onnx.checker and strict shape inference (with data propagation) on the model's skeleton, serialized
    once. Raises onnx.checker.ValidationError or onnx.shape_inference.InferenceError. A model of many small
    initializers (a generated 100k-node graph has 85k) is serialized whole instead: one C-level pass (0.03 s
    there) beats the skeleton's Python loop over the initializers (0.2 s); past FULL_SERIALIZE_BYTES the
    skeleton's savings win again."""
    data = None
    if len(proto.graph.initializer) > MANY_INITIALIZERS:
        try:
            data = proto.SerializeToString()
        except ValueError:  # over protobuf's 2 GB limit
            data = None
        if data is not None and len(data) > FULL_SERIALIZE_BYTES:
            data = None
    check_serialized(data if data is not None else skeleton(proto).SerializeToString())


def check_serialized(data: bytes) -> None:
    onnx.checker.check_model(data)
    # The C entry point: onnx.shape_inference.infer_shapes would also parse the inferred model back into
    # Python, which the verifier never reads (0.07 s at 100k nodes).
    c_shape_inference.infer_shapes(data, False, True, True)  # check_type, strict_mode, data_prop


def tensor_size_problems(proto: onnx.ModelProto) -> list[str]:
    """Large raw tensors whose byte count does not match their dims (the checker no longer sees them)."""
    problems = []
    for tensor in proto.graph.initializer:
        if not tensor.HasField("raw_data") or _elements(tensor) <= SMALL_TENSOR_ELEMENTS:
            continue
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if len(tensor.raw_data) != _elements(tensor) * itemsize:
            problems.append(f"initializer {tensor.name!r} has {len(tensor.raw_data)} bytes, "
                            f"dims {list(tensor.dims)} need {_elements(tensor) * itemsize}")
    return problems


def infer_types(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                strict: bool = False) -> dict[str, tuple[int, list[int | str] | None]]:
    """Run onnx shape inference on the skeleton; return {value name: (elem_type, dims or None)}."""
    skel = skeleton(proto)
    if input_shapes:
        _set_input_shapes(skel, input_shapes)
    inferred = check_types(skel, strict=strict)
    graph = inferred.graph
    types: dict[str, tuple[int, list[int | str] | None]] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[info.name] = _value_type(info)
    for info in _contrib_types(inferred, types):
        if types.get(info.name, (0, None))[1] is None:
            types[info.name] = _value_type(info)
    for tensor in proto.graph.initializer:
        types[tensor.name] = (tensor.data_type, list(tensor.dims))
    return types


def _contrib_types(inferred: onnx.ModelProto, types: dict) -> list[onnx.ValueInfoProto]:
    """Types from ONNX Runtime's symbolic shape inference, when a com.microsoft op's output has no shape: onnx's
    inference does not know them (FastGelu from fuse-gelu, an ORT-optimized transformer's fused ops) and leaves
    every value after them untyped, so costs went unknown and prune locked the channels there. Empty when it
    fails. Not run when their outputs carry declared types (insert-qdq's fused Gelu keeps its output's): it is
    pure Python, and took a toy ViT's insert-qdq from 0.05 to 0.08 s."""
    if all(types.get(name, (0, None))[1] is not None for node in inferred.graph.node
           if node.domain == "com.microsoft" for name in node.output if name):
        return []
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        out = SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
    except Exception as e:  # its own limits (an op it does not know): keep what onnx inferred
        log.debug("symbolic shape inference failed (%s: %s); com.microsoft outputs stay untyped",
                  type(e).__name__, e)
        return []
    return [] if out is None else list(out.graph.value_info) + list(out.graph.output)


def check_types(skel: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """Run onnx shape inference (with data propagation) on a skeleton; return the inferred model.
    With strict=True an inconsistency raises onnx.shape_inference.InferenceError."""
    return onnx.shape_inference.infer_shapes(skel, strict_mode=strict, data_prop=True)


def _value_type(info: onnx.ValueInfoProto) -> tuple[int, list[int | str] | None]:
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or "?")
    return tensor_type.elem_type, dims


def _set_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    from irtool.errors import InputError

    inputs = {i.name: i for i in proto.graph.input}
    sizes = symbol_sizes([(i.name, _value_type(i)[1]) for i in proto.graph.input], shapes)
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputError(f"--input-shape names {name!r}, which is not a model input "
                             f"(inputs: {', '.join(sorted(inputs))})")
        shape = inputs[name].type.tensor_type.shape
        if shape.dim and len(shape.dim) != len(dims):
            raise InputError(f"--input-shape {name}: rank {len(dims)} does not match the model's rank {len(shape.dim)}")
        for i, (old, new) in enumerate(zip(shape.dim, dims, strict=False)):
            if old.HasField("dim_value") and old.dim_value != new:
                raise InputError(f"--input-shape {name}: dim {i} is fixed to {old.dim_value} in the model, got {new}")
        shape.ClearField("dim")
        for d in dims:
            if isinstance(d, str):  # a dim left symbolic (irtool.analysis.channels fixes the batch only)
                shape.dim.add().dim_param = d
            else:
                shape.dim.add().dim_value = d
    for info in proto.graph.input:
        for dim in info.type.tensor_type.shape.dim if info.name not in shapes else ():
            if not dim.HasField("dim_value") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]


def symbol_sizes(declared: Iterable[tuple[str, list | None]], given: Mapping[str, list]) -> dict[str, int]:
    """Sizes the `given` input shapes fix for named symbolic dims of the `declared` (name, dims) inputs. A name
    is one size in every input that has it (the batch N of an image and its mask, the sequence length of token
    ids and their attention mask), so it binds the inputs not given too."""
    from irtool.errors import InputError

    sizes: dict[str, int] = {}
    source: dict[str, str] = {}
    for name, dims in declared:
        for i, (old, new) in enumerate(zip(dims or [], given.get(name) or [], strict=False)):
            if not isinstance(old, str) or old in ("", "?") or not isinstance(new, int):
                continue
            if sizes.setdefault(old, new) != new:
                raise InputError(f"--input-shape {name}: dim {i} ({old!r}) is {new}, but --input-shape "
                                 f"{source[old]} makes {old!r} {sizes[old]}")
            source.setdefault(old, name)
    return sizes
