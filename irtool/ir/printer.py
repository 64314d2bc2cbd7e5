"""Compact textual form of the IR, used by `irtool show` and by golden files.

    graph main (%x: f32[1,3,8,8]) -> (%y: f32[1,10])
      @w = f32[8,3,3,3] #1a2b3c4d
      %c1 : f32[1,8,8,8] = Conv[conv1](%x, @w, @b) {kernel_shape=[3,3], pads=[1,1,1,1]}

One line per node: outputs with dtype and shape, the op, the node name in brackets, inputs (`%`
values, `@` initializers/constants) and sorted attributes. Constants with at most 8 elements print
their values; larger ones print a CRC32 of their bytes so any change to weights shows in a diff.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types

_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.INT8: "i8", onnx.TensorProto.UINT8: "u8",
    onnx.TensorProto.INT16: "i16", onnx.TensorProto.UINT16: "u16", onnx.TensorProto.INT32: "i32",
    onnx.TensorProto.UINT32: "u32", onnx.TensorProto.INT64: "i64", onnx.TensorProto.UINT64: "u64",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.STRING: "str",
}
INLINE_ELEMENTS = 8


def dtype_name(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type, onnx.TensorProto.DataType.Name(elem_type).lower())


def format_model(model: Model, input_shapes: dict[str, list[int]] | None = None) -> str:
    """The whole model as text, with inferred dtypes and shapes."""
    types = infer_types(model.shape_inference_proto(), input_shapes)
    lines = [f"opset {model.opset}"]
    lines.extend(_format_graph(model.graph, types, indent=""))
    return "\n".join(lines) + "\n"


def _type_text(name: str, types: dict, tensor: gs.Tensor | None = None) -> str:
    if name in types:
        elem, dims = types[name]
    elif tensor is not None and tensor.dtype is not None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)) if not isinstance(tensor.dtype, int) \
            else tensor.dtype
        dims = list(tensor.shape) if tensor.shape is not None else None
    else:
        return "?"
    shape = "?" if dims is None else "[" + ",".join(str(d) for d in dims) + "]"
    return f"{dtype_name(elem)}{shape}"


def _value_ref(tensor: gs.Tensor) -> str:
    if not tensor.name:
        return "_"
    return ("@" if isinstance(tensor, gs.Constant) else "%") + tensor.name


def _format_graph(graph: gs.Graph, types: dict, indent: str) -> list[str]:
    ins = ", ".join(f"%{t.name}: {_type_text(t.name, types, t)}" for t in graph.inputs)
    outs = ", ".join(f"{_value_ref(t)}: {_type_text(t.name, types, t)}" for t in graph.outputs)
    lines = [f"{indent}graph {graph.name or 'main'} ({ins}) -> ({outs})"]
    inner = indent + "  "
    seen: set[str] = set()
    # Constants a graph returns directly (e.g. a folded output) print too, so their values show in diffs.
    read = [t for node in graph.nodes for t in node.inputs] + list(graph.outputs)
    for tensor in read:
        if isinstance(tensor, gs.Constant) and tensor.name not in seen:
            seen.add(tensor.name)
            lines.append(f"{inner}@{tensor.name} = {_constant_text(tensor)}")
    for node in graph.nodes:
        lines.extend(_format_node(node, types, inner))
    return lines


def _constant_text(tensor: gs.Constant) -> str:
    values = np.asarray(tensor.values)
    elem = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    head = f"{dtype_name(elem)}[{','.join(str(d) for d in values.shape)}]"
    if values.size <= INLINE_ELEMENTS:
        return f"{head} {np.array2string(values.reshape(-1), separator=',', precision=6, max_line_width=10**6)}"
    return f"{head} #{zlib.crc32(np.ascontiguousarray(values).tobytes()):08x}"


def _format_node(node: gs.Node, types: dict, indent: str) -> list[str]:
    outs = ", ".join(f"%{t.name} : {_type_text(t.name, types, t)}" if t.name else "_" for t in node.outputs)
    ins = ", ".join(_value_ref(t) for t in node.inputs)
    domain = f"{node.domain}." if node.domain and node.domain != "ai.onnx" else ""
    plain = {k: v for k, v in sorted(node.attrs.items()) if not isinstance(v, gs.Graph)}
    attrs = ", ".join(f"{k}={_attr_text(v)}" for k, v in plain.items())
    line = f"{indent}{outs} = {domain}{node.op}[{node.name}]({ins})" + (f" {{{attrs}}}" if attrs else "")
    lines = [line]
    for key, value in sorted(node.attrs.items()):
        if isinstance(value, gs.Graph):
            lines.append(f"{indent}  {key}:")
            lines.extend(_format_graph(value, types, indent + "    "))
    return lines


def _attr_text(value) -> str:
    if isinstance(value, gs.Constant):
        return _constant_text(value)
    if isinstance(value, np.ndarray):
        return np.array2string(value.reshape(-1), separator=",", precision=6)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_attr_text(v) for v in value) + "]"
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return repr(value)
    return str(value)
