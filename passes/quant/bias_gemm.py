"""ort-cpu: a quantized MatMul whose only reader adds a constant bias runs as one Gemm (ONNX Runtime's QGemm).

torch exports nn.Linear on [batch, tokens, features] as MatMul + Add(bias). Quantized op by op, that is a
QLinearMatMul rounding its output to u8, then a QLinearAdd reading it back, adding a quantized bias and rounding
again (quantize_static's model does the same). As Gemm(x, W, bias), the bias enters the int32 accumulator and the
output is rounded once: measured on a [16, 197, 192] x [192, 768] layer (1 thread): 3.44 ms against 5.72 at
batch 16, 0.222 against 0.347 ms at batch 1, output SQNR 30.91 against 30.30 dB. ONNX Runtime fuses MatMul + Add
into Gemm itself only for inputs of known shape; with a dynamic batch it leaves MatMulIntegerToFloat and a float
Add. `calibrate` then need not observe the MatMul's output either (the ViT of bench/quant_bench.py: 72 of its
231 observed tensors).

The plan (placement.plan_ort_cpu) quantizes the Add's output in place of the MatMul's, and this module rewrites
each pair when the Q/DQ go in: inputs of rank r > 2 are flattened to [-1, K] by a Reshape and the Gemm's
[M, N] output is shaped back, to [-1, d1, ..., N] when d1.. are known, else to the input's leading dims
(Shape, end=-1) and N. The flattened input and the Gemm output share their neighbours' scales, so ONNX Runtime
moves the integers through both Reshapes. A Relu or Clip right after the Add (nn.Linear then ReLU) moves between
the Gemm and the Reshape back, where its Q follows it and ONNX Runtime folds it into the QGemm's output range
(a ReLU MLP of 4 blocks on [1, 64, 256] tokens: 41.55 dB against 40.26 as QLinearMatMul + QLinearAdd of a u8
bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import GraphEdit
from irtool.ir.skeleton import infer_types

if TYPE_CHECKING:  # placement imports bias_add from here
    from irtool.passes.quant.placement import QuantPlan


def linear_weight(matmul: gs.Node) -> gs.Constant | None:
    """The constant float32 [K, N] second operand of a two-input MatMul whose first operand is computed (an
    nn.Linear on tokens), or None."""
    if matmul.op != "MatMul" or len(matmul.inputs) != 2 or isinstance(matmul.inputs[0], gs.Constant):
        return None
    weight = matmul.inputs[1]
    if not isinstance(weight, gs.Constant) or np.ndim(weight.values) != 2 \
            or np.asarray(weight.values).dtype != np.float32:
        return None
    return weight


def bias_add(matmul: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    """The Add that is the only reader of this MatMul's output and adds a constant float bias along its last
    axis (shape [N]; [1, ..., N] where the input's rank is known and no lower), or None."""
    weight = matmul.inputs[1] if len(matmul.inputs) == 2 else None
    out = matmul.outputs[0]
    if (matmul.op != "MatMul" or not isinstance(weight, gs.Constant) or np.ndim(weight.values) != 2
            or len(out.outputs) != 1 or out.name in graph_outputs or out.outputs[0].op != "Add"):
        return None
    add = out.outputs[0]
    others = [t for t in add.inputs if t is not out]
    if len(others) != 1 or len(add.inputs) != 2 or not isinstance(others[0], gs.Constant):
        return None
    bias = np.asarray(others[0].values)
    width = np.shape(weight.values)[1]
    rank = len(matmul.inputs[0].shape) if matmul.inputs[0].shape is not None else 1
    if bias.dtype != np.float32 or bias.size != width or bias.shape[-1:] != (width,) \
            or (bias.ndim > 1 and bias.ndim > rank):
        return None
    return add


def fuse(model: Model, plan: QuantPlan) -> int:
    """Rewrite each of the plan's (MatMul, bias Add) pairs into Gemm between Reshapes (none for 2-D inputs), in
    place: the MatMul node becomes the Gemm (its name, and so its weight slot, stay), the Add's output keeps its
    name; the flattened input and the Gemm's output join the plan with their neighbours' scales. Returns the
    number of Gemms made."""
    dims = _input_dims(model, [matmul.inputs[0] for matmul, _, _ in plan.bias_adds])
    with GraphEdit(model.graph) as edit:  # the Adds leave in one rebuild of the node list
        for matmul, add, activation in plan.bias_adds:
            x, weight = matmul.inputs
            bias = next(t for t in add.inputs if isinstance(t, gs.Constant))
            y = add.outputs[0]
            edit.remove(add)
            flat_bias = gs.Constant(model.unique_name(f"{bias.name}_row"), np.asarray(bias.values).reshape(-1))
            matmul.op, matmul.attrs = "Gemm", {}
            if dims.get(x.name) is not None and len(dims[x.name]) == 2:
                _relink(matmul, [x, weight, flat_bias], y)
                continue
            rows, flatten = _reshaped(model, x, [-1, np.shape(weight.values)[0]], f"{matmul.name}_rows")
            out = gs.Variable(model.unique_name(f"{matmul.name}_gemm"), dtype=np.float32)
            _relink(matmul, [rows, weight, flat_bias], out)
            if activation is not None:  # Gemm -> Relu -> Q, which ONNX Runtime fuses, then the Reshape back
                y = activation.outputs[0]
                out = _moved_inside(model, activation, out, f"{matmul.name}_{activation.op.lower()}")
            shape = _output_shape(model, x, dims.get(x.name), np.shape(weight.values)[1], matmul.name)
            model.graph.nodes.append(gs.Node("Reshape", model.unique_name(f"{matmul.name}_unflatten"),
                                             inputs=[out, shape], outputs=[y]))
            _share(plan, x, rows, (matmul, 0), (flatten, 0))
            if y.name in plan.tensors:
                plan.add(out)
                plan.share.append({out.name, y.name})
    return len(plan.bias_adds)


def _moved_inside(model: Model, activation: gs.Node, rows: gs.Tensor, base: str) -> gs.Variable:
    """Apply `activation` (Relu or Clip, elementwise) to the Gemm's 2-D output `rows` instead; returns its new
    output, which the Reshape back takes."""
    out = gs.Variable(model.unique_name(base), dtype=np.float32)
    _relink(activation, [rows, *activation.inputs[1:]], out)
    return out


def _share(plan: QuantPlan, x: gs.Tensor, rows: gs.Tensor, old: tuple, new: tuple) -> None:
    """x's Q/DQ now feeds the Reshape (`new` slot) in place of the Gemm (`old`), which reads `rows`, quantized
    with x's scale."""
    if x.name not in plan.tensors:
        return
    plan.slots[x.name] = [new if s[0] is old[0] and s[1] == old[1] else s for s in plan.slots[x.name]]
    plan.add(rows)
    plan.share.append({x.name, rows.name})


def _relink(node: gs.Node, inputs: list[gs.Tensor], output: gs.Tensor) -> None:
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.outputs.clear()
    node.outputs.append(output)


def _reshaped(model: Model, x: gs.Tensor, shape: list[int], base: str) -> tuple[gs.Variable, gs.Node]:
    out = gs.Variable(model.unique_name(base), dtype=np.float32)
    node = gs.Node("Reshape", model.unique_name(f"{base}_Reshape"), outputs=[out], inputs=[
        x, gs.Constant(model.unique_name(f"{base}_shape"), np.array(shape, np.int64))])
    model.graph.nodes.append(node)
    return out, node


def _input_dims(model: Model, inputs: list[gs.Tensor]) -> dict[str, list | None]:
    """The dims of these tensors: from the IR, or from one shape inference when the IR lacks some (exports
    without value_info; 20 ms on the bench's ViT)."""
    dims = {x.name: list(x.shape) if x.shape is not None else None for x in inputs}
    if any(d is None for d in dims.values()):
        inferred = infer_types(model.shape_inference_proto())
        dims.update({name: inferred.get(name, (None, None))[1] for name, d in dims.items() if d is None})
    return dims


def _output_shape(model: Model, x: gs.Tensor, dims: list | None, width: int, base: str) -> gs.Tensor:
    """[-1, d1, ..., width] when x's dims after the first are known; else x's leading dims and width, computed."""
    if dims is not None and len(dims) == 1:  # [K] @ [K, N]: [N]
        return gs.Constant(model.unique_name(f"{base}_out_shape"), np.array([width], np.int64))
    middle = dims[1:-1] if dims is not None else [None]
    if all(isinstance(d, int) and d > 0 for d in middle):
        return gs.Constant(model.unique_name(f"{base}_out_shape"), np.array([-1, *middle, width], np.int64))
    lead = gs.Variable(model.unique_name(f"{base}_lead"), dtype=np.int64)
    if model.opset >= 15:
        model.graph.nodes.append(gs.Node("Shape", model.unique_name(f"{base}_Shape"), attrs={"end": -1},
                                         inputs=[x], outputs=[lead]))
    else:
        full = gs.Variable(model.unique_name(f"{base}_shape_of_input"), dtype=np.int64)
        model.graph.nodes.append(gs.Node("Shape", model.unique_name(f"{base}_Shape"), inputs=[x], outputs=[full]))
        model.graph.nodes.append(gs.Node("Slice", model.unique_name(f"{base}_Slice"), inputs=[
            full, gs.Constant(model.unique_name(f"{base}_zero"), np.array([0], np.int64)),
            gs.Constant(model.unique_name(f"{base}_minus_one"), np.array([-1], np.int64))], outputs=[lead]))
    shape = gs.Variable(model.unique_name(f"{base}_out_shape"), dtype=np.int64)
    model.graph.nodes.append(gs.Node("Concat", model.unique_name(f"{base}_Concat"), attrs={"axis": 0}, inputs=[
        lead, gs.Constant(model.unique_name(f"{base}_width"), np.array([width], np.int64))], outputs=[shape]))
    return shape
