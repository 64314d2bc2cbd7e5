"""Weight-only INT8: store MatMul/Gemm weights and embedding tables as int8 and dequantize them in the graph.

For a float32 weight W and output channel c (a column of the weight as the op reads it), symmetric
quantization with zero point 0:

    s_c = max|W[..., c]| / 127            (per-channel; per-tensor: s = max|W| / 127)
    q   = clip(round(W / s_c), -127, 127)  stored as int8  (round half to even; s_c = 1 for an all-zero channel)
    W'  = DequantizeLinear(q, s, axis) = q · s_c,      |W − W'| ≤ s_c / 2 element-wise

-128 is never used, so the grid is symmetric and −W quantizes to −q. The channel axis is the output
axis of the weight: MatMul B[..., K, N] -> axis = rank − 1 (N); Gemm B[K, N] (transB=0) -> axis 1,
B[N, K] (transB=1) -> axis 0. The rewrite is

    Y = MatMul(X, W)   ->   Y = MatMul(X, DequantizeLinear(W_q, W_scale, axis))

and the activation X stays float: the weight bytes shrink about 4x (int8 plus one float32 scale per
channel), ONNX Runtime dequantizes the weight at run time, and the error is the weight rounding only.
Per-channel scales follow each column's range, so one column with an outlier no longer coarsens the
grid of all the others (the outlier only costs its own column).

Embedding lookups, Gather(E, ids) on axis 0 of a 2-D table, read int8 rows with one scale per row (token):

    Y = Gather(E, ids)   ->   Y = Cast(Gather(E_q, ids)) · Unsqueeze(Gather(s, ids), -1)

(DequantizeLinear's axis cannot follow the picked rows; per-tensor: DequantizeLinear(Gather(E_q, ids), s)).
ONNX Runtime's quantize_dynamic gives the table one scale, and a rare token's small row rounds to zeros; the
table is a large share of a small language model's weights. A tied LM head (Gemm transB=1 reading E) shares
the same int8 table and row scales, and so does one that reads it through a Transpose (MatMul(x, Transpose(E)),
as torch.export writes it): Transpose(DequantizeLinear(E_q, s, axis=0)).

A lookup whose table the model already stores as int8 with one scale per table row (a tied LM head that
`insert-qdq` quantized, which `quant` runs before this pass: DequantizeLinear of E^T's integers [H, V] along
axis 1) reads those integers instead of storing a second copy (`share-head`, default true; stat
`tables_shared`):

    Y = Transpose(Cast(Gather(Q, ids, axis=1)) · Gather(s, ids), perm=[1, ..., r, 0])     (ids of rank r)

The rows are then on the head's grid: for ort-cpu, 7-bit weights (reduce-range), twice the step of this pass's
own rows. Found only where q · s lies within half a step of every table value, or where insert-qdq noted q as
gptq's rounding of this very table (a digest, ROUNDED_FROM_KEY: quant-gptq), so another weight of the same shape is
never taken for the table. The stats count such a table once, its float bytes in `weight_bytes_before` and
the head's integers and scales it now reads in `weight_bytes_after` (bytes the model held already), so
`compression` is the table's (about 4), not 0.

Quantized: MatMul (second input), Gemm (input B) and Gather (input 0) in the standard domain whose weight is a
float32 or float16 constant of rank >= 2 (exactly 2 for Gemm and Gather) with at least `min-size` elements and
only finite values, unless the node's name matches an `exclude` regex. A weight read by several quantized nodes
with the same axis is quantized once. A weight that a node this pass leaves alone reads too (excluded, another op
type, a tied head's MatMul under op-types=[Gather]) stays float for every reader, with a warning (stat
`skipped_float_readers`): its float32 original stays for that node, so an int8 copy would only add bytes (a tied
torch.export LM under op-types=[Gather]: 75 -> 95 KiB) and rounding error. A lookup that reads a head's integers
(share-head) adds no bytes and is still made.
DequantizeLinear's `axis` needs opset 13, which irtool's loader already requires. Runs on the main graph only.

A float16 weight (a model `fp16` converted, or exported in half precision) is quantized the same way and
its float32 DequantizeLinear output is Cast to float16, since DequantizeLinear writes float32 only before
opset 19: int8 halves such a weight's bytes, and the error adds float16's rounding of q · s_c. (Before,
such weights were skipped without a word and the pass changed nothing on a float16 model.)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.ir.rewrite import is_default_domain, values_digest
from irtool.ir.topo import toposort_graph
from irtool.passes.quant.insert_qdq import ROUNDED_FROM_KEY
from irtool.passmanager import Pass, PassContext, PassResult
from irtool.pipeline import Regex

QMAX = 127
SUPPORTED_OPS = ("MatMul", "Gemm", "Gather")


class QuantDynamic(Pass):
    """Store MatMul/Gemm weights and embedding tables as per-channel symmetric int8, dequantized in the graph."""

    name = "quant-dynamic"

    @dataclass(frozen=True)
    class Options:
        per_channel: bool = True
        op_types: tuple[str, ...] = SUPPORTED_OPS
        exclude: tuple[Regex, ...] = ()
        min_size: int = 1024
        share_head: bool = True

        def __post_init__(self):
            unknown = sorted(set(self.op_types) - set(SUPPORTED_OPS))
            if unknown:
                raise ValueError(f"op-types {unknown} are not supported; choose from {list(SUPPORTED_OPS)}")
            if self.min_size < 0:
                raise ValueError(f"min-size must be >= 0, got {self.min_size}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets, skipped = self._targets(model)
        if not targets:
            return PassResult(modified=False, stats={"weights_quantized": 0, **skipped})
        quantizer = _Quantizer(model, self.options.per_channel, self.options.share_head)
        kept = _read_in_float(model, targets)
        for node, axis in targets:
            if id(_weight(node)) in kept and (node.op != "Gather" or not quantizer.reads_stored(node)):
                quantizer.kept_float(node, kept[id(_weight(node))], ctx)
            elif node.op == "Gather":
                quantizer.lookup(node)
            elif (transpose := _transposed(node)) is not None:  # the int8 table stays one, shared with lookups
                transpose.inputs[0] = quantizer.dequantized(transpose.inputs[0], axis)
            else:
                node.inputs[1] = quantizer.dequantized(node.inputs[1], axis)
        toposort_graph(model.graph)
        stats = {**quantizer.stats(), **skipped}
        return PassResult(modified=stats["weights_quantized"] > 0, preserved=(), stats=stats)

    def _targets(self, model: Model) -> tuple[list[tuple[gs.Node, int]], dict[str, int]]:
        targets: list[tuple[gs.Node, int]] = []
        skipped = {"skipped_small": 0, "skipped_excluded": 0}
        for node in model.graph.nodes:
            axis = _channel_axis(node) if node.op in self.options.op_types else None
            if axis is None:
                continue
            if any(re.search(pattern, node.name) for pattern in self.options.exclude):
                skipped["skipped_excluded"] += 1
            elif math.prod(_weight(node).shape) < self.options.min_size:
                skipped["skipped_small"] += 1
            else:
                targets.append((node, axis))
        return targets, skipped


def _read_in_float(model: Model, targets: list[tuple[gs.Node, int]]) -> dict[int, gs.Node | None]:
    """{id of a target's weight: a node this pass leaves alone that reads it (None: a graph output)}. A tied head's
    Transpose reads the table for the MatMuls it feeds: it counts as theirs when they are all targets."""
    chosen = {id(node) for node, _ in targets}
    outputs = {id(t) for t in model.graph.outputs}
    found: dict[int, gs.Node | None] = {}
    for node, _ in targets:
        weight = _weight(node)
        if id(weight) in outputs:
            found[id(weight)] = None
        for reader in weight.outputs:
            if id(reader) in chosen or (reader.op == "Transpose" and reader.outputs[0].outputs
                                        and all(id(n) in chosen for n in reader.outputs[0].outputs)):
                continue
            found.setdefault(id(weight), reader)
    return found


def _weight(node: gs.Node) -> gs.Tensor:
    if node.op == "Gather":
        return node.inputs[0]
    transpose = _transposed(node)
    return node.inputs[1] if transpose is None else transpose.inputs[0]


def _transposed(node: gs.Node) -> gs.Node | None:
    """The Transpose that makes a MatMul's weight out of a 2-D constant [N, K]: torch.export writes a tied LM head
    so, reading the embedding table the lookup reads. That constant is the weight, its rows the channels (axis 0)."""
    weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) > 1 else None
    if weight is None or len(weight.inputs) != 1 or weight.inputs[0].op != "Transpose":
        return None
    transpose = weight.inputs[0]
    source = transpose.inputs[0]
    if not isinstance(source, gs.Constant) or len(source.shape) != 2 \
            or list(transpose.attrs.get("perm", [1, 0])) != [1, 0]:
        return None
    return transpose


def _channel_axis(node: gs.Node) -> int | None:
    """The output-channel axis of the node's float32 or float16 constant weight, or None if it has none; for an
    embedding lookup (Gather of rows of a 2-D table) the row axis, 0."""
    if not is_default_domain(node) or len(node.inputs) < 2 or not isinstance(_weight(node), gs.Constant):
        return None
    weight = _weight(node)  # dtype and shape only: lazy values stay unloaded
    rank = len(weight.shape)
    if weight.dtype not in (np.float32, np.float16) or rank < 2:
        return None
    if node.op == "Gather":
        return 0 if rank == 2 and int(node.attrs.get("axis", 0)) == 0 else None
    if _transposed(node) is not None:
        return 0
    if node.op == "Gemm":
        if rank != 2:
            return None
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return rank - 1


def quantize_symmetric(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) with q = clip(round(W / s), -127, 127); per channel along `axis`, or one
    scale for the whole tensor when axis is None. A zero range gets scale 1 (its values are all 0)."""
    w = weight.astype(np.float64)
    others = tuple(range(w.ndim)) if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    peak = np.abs(w).max(axis=others, initial=0.0, keepdims=True)
    # Floor at the smallest normal float32 so a denormal range cannot round its scale to 0.
    scale = np.where(peak > 0, np.maximum(peak / QMAX, np.finfo(np.float32).tiny), 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.astype(np.float64)), -QMAX, QMAX).astype(np.int8)
    return q, scale.reshape(-1) if axis is not None else scale.reshape(())


class _Quantizer:
    """Creates (once per weight and axis) the int8 constant, its scale and the DequantizeLinear."""

    def __init__(self, model: Model, per_channel: bool, share_head: bool = False):
        self.model, self.per_channel, self.share_head = model, per_channel, share_head
        self.shared: set[int] = set()  # tables whose lookups read a head's integers
        self.done: dict[tuple[int, int], gs.Variable] = {}
        self.constants: dict[tuple[int, int], tuple[gs.Constant, gs.Constant]] = {}
        self.looked_up: set[tuple[int, int]] = set()  # tables read by lookups
        self.nonfinite: set[tuple[int, int]] = set()
        self.float_readers: set[int] = set()  # weights left float: another reader keeps them float anyway
        self.bytes_before = self.bytes_after = 0

    def dequantized(self, weight: gs.Constant, axis: int) -> gs.Tensor:
        """The DequantizeLinear output replacing `weight`, or `weight` itself if it holds inf or NaN."""
        key = (id(weight), axis if self.per_channel else -1)
        if key in self.nonfinite or (key not in self.done and not np.isfinite(np.asarray(weight.values)).all()):
            self.nonfinite.add(key)
            return weight
        if key not in self.done:
            self.done[key] = self._quantize(weight, axis)
        return self.done[key]

    def _quantize(self, weight: gs.Constant, axis: int) -> gs.Variable:
        q_const, s_const = self._constants(weight, axis)
        unique = self.model.unique_name
        out = gs.Variable(unique(f"{weight.name}_dequantized"), dtype=np.float32, shape=list(weight.shape))
        attrs = {"axis": axis} if self.per_channel else {}
        node = gs.Node("DequantizeLinear", name=unique(f"{weight.name}_DequantizeLinear"), attrs=attrs,
                       inputs=[q_const, s_const], outputs=[out])
        self.model.graph.nodes.append(node)
        if weight.dtype == np.float16:
            return self._to_half(out, unique)
        return out

    def _constants(self, weight: gs.Constant, axis: int) -> tuple[gs.Constant, gs.Constant]:
        """The int8 weight and its scales, made once per weight and axis (a MatMul and a lookup may share them)."""
        key = (id(weight), axis if self.per_channel else -1)
        if key not in self.constants:
            values = np.asarray(weight.values)
            q, scale = quantize_symmetric(values, axis if self.per_channel else None)
            unique = self.model.unique_name
            self.constants[key] = (gs.Constant(unique(f"{weight.name}_quantized"), q),
                                   gs.Constant(unique(f"{weight.name}_scale"), scale))
            self.bytes_before += values.nbytes
            self.bytes_after += q.nbytes + scale.nbytes
        return self.constants[key]

    def reads_stored(self, node: gs.Node) -> bool:
        """Whether the lookup would read integers the model holds already (share-head), adding no bytes."""
        return self.share_head and self.per_channel and stored_rows(self.model, node.inputs[0]) is not None

    def kept_float(self, node: gs.Node, reader: gs.Node | None, ctx: PassContext) -> None:
        weight = _weight(node)
        if id(weight) not in self.float_readers:
            by = "is a model output" if reader is None else f"is read by {reader.op} {reader.name!r}, which stays float"
            ctx.logger.warning("quant-dynamic: %s stays float: it %s, and an int8 copy beside it would only add bytes",
                               weight.name, by)
        self.float_readers.add(id(weight))

    def lookup(self, node: gs.Node) -> None:
        """An embedding lookup Gather(E, ids) reads int8 rows instead: Gather(E_q, ids) dequantized by the scales
        of the rows it picked, Gather(s, ids) (one scale per token row: a rare token's small row keeps its own
        grid; DequantizeLinear's axis cannot follow picked rows), or by DequantizeLinear with one scale."""
        table, ids, y = node.inputs[0], node.inputs[1], node.outputs[0]
        key = (id(table), 0 if self.per_channel else -1)
        if key in self.nonfinite or (key not in self.constants and not np.isfinite(np.asarray(table.values)).all()):
            self.nonfinite.add(key)
            return
        # Its integers made by this pass already (a weight-only head reading it) are shared below as they are.
        mine = key in self.constants
        stored = stored_rows(self.model, table) if self.share_head and self.per_channel and not mine else None
        if stored is not None and (stored[2] == 0 or ids.shape is not None):
            self.looked_up.add(key)
            self._lookup_stored(node, *stored)
            return
        q_const, s_const = self._constants(table, 0)
        self.looked_up.add(key)
        name, unique = node.name, self.model.unique_name
        self._remove(node)
        half = table.dtype == np.float16
        out = gs.Variable(unique(f"{y.name}_dequantized"), dtype=np.float32) if half else y
        rows = gs.Variable(unique(f"{y.name}_quantized"), dtype=np.int8)
        new = [gs.Node("Gather", name, attrs={"axis": 0}, inputs=[q_const, ids], outputs=[rows])]
        if self.per_channel:
            new += self._row_scaled(name, rows, s_const, ids, out)
        else:
            new.append(gs.Node("DequantizeLinear", unique(f"{name}_dequantized"), inputs=[rows, s_const],
                               outputs=[out]))
        if half:
            new.append(gs.Node("Cast", unique(f"{name}_fp16"), attrs={"to": onnx.TensorProto.FLOAT16},
                               inputs=[out], outputs=[y]))
        self.model.graph.nodes.extend(new)

    def _lookup_stored(self, node: gs.Node, q: gs.Constant, scales: gs.Constant, axis: int) -> None:
        """The lookup reads the rows of the table that a layer stores as int8 already (stored_rows): picked along
        `axis` of those integers, scaled by their own scales, and, from a head's [H, V] weight, transposed to
        [*ids, H]."""
        table, ids, y = node.inputs[0], node.inputs[1], node.outputs[0]
        name, unique = node.name, self.model.unique_name
        self._remove(node)
        rows = gs.Variable(unique(f"{y.name}_quantized"), dtype=np.int8)
        out = y if axis == 0 else gs.Variable(unique(f"{y.name}_columns"), dtype=np.float32)
        new = [gs.Node("Gather", name, attrs={"axis": axis}, inputs=[q, ids], outputs=[rows]),
               *self._row_scaled(name, rows, scales, ids, out, last=axis == 0)]
        if axis == 1:  # [H, *ids] -> [*ids, H]
            rank = len(ids.shape)
            new.append(gs.Node("Transpose", unique(f"{name}_rows"), attrs={"perm": [*range(1, rank + 1), 0]},
                               inputs=[out], outputs=[y]))
        self.model.graph.nodes.extend(new)
        if id(table) not in self.shared:  # counted once, however many lookups read it
            self.shared.add(id(table))
            # The bytes the lookup now reads are the head's integers and scales, which the model held already.
            self.bytes_before += np.asarray(table.values).nbytes
            self.bytes_after += np.asarray(q.values).nbytes + np.asarray(scales.values).nbytes

    def _remove(self, node: gs.Node) -> None:
        """Take the lookup out, detached, so that its replacement may produce its output."""
        self.model.graph.nodes.remove(node)
        node.inputs.clear()
        node.outputs.clear()

    def _row_scaled(self, name: str, rows: gs.Variable, scales: gs.Constant, ids: gs.Tensor,
                    out: gs.Variable, last: bool = True) -> list[gs.Node]:
        """out = Cast(rows) · Unsqueeze(Gather(scales, ids), -1): each picked row times its own scale. Rows picked
        as the columns of a [H, V] weight ([H, *ids], `last` False) take the picked scales as they are."""
        unique = self.model.unique_name
        picked, wide, floats = (gs.Variable(unique(f"{out.name}_{part}")) for part in ("scales", "scale", "float"))
        nodes = [gs.Node("Gather", unique(f"{name}_scales"), attrs={"axis": 0}, inputs=[scales, ids],
                         outputs=[picked])]
        if last:
            axis = gs.Constant(unique(f"{out.name}_last_axis"), np.array([-1], np.int64))
            nodes.append(gs.Node("Unsqueeze", unique(f"{name}_scale"), inputs=[picked, axis], outputs=[wide]))
        return nodes + [gs.Node("Cast", unique(f"{name}_float"), attrs={"to": onnx.TensorProto.FLOAT},
                                inputs=[rows], outputs=[floats]),
                        gs.Node("Mul", unique(f"{name}_dequantized"), inputs=[floats, wide if last else picked],
                                outputs=[out])]

    def _to_half(self, value: gs.Variable, unique) -> gs.Variable:
        out = gs.Variable(unique(f"{value.name}_fp16"), dtype=np.float16, shape=value.shape)
        self.model.graph.nodes.append(gs.Node("Cast", name=unique(f"{value.name}_Cast"),
                                              attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[value], outputs=[out]))
        return out

    def stats(self) -> dict[str, float | int]:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else 0.0
        return {"weights_quantized": len(self.done.keys() | self.looked_up), "weight_bytes_before": self.bytes_before,
                "weight_bytes_after": self.bytes_after, "compression": round(ratio, 3),
                "skipped_nonfinite": len(self.nonfinite), "tables_shared": len(self.shared),
                "skipped_float_readers": len(self.float_readers)}


def stored_rows(model: Model, table: gs.Constant) -> tuple[gs.Constant, gs.Constant, int] | None:
    """(int8 q, scales, axis) of a DequantizeLinear in the model that holds `table` [V, H] on a per-row grid: q
    is [V, H] dequantized along axis 0, or [H, V] along axis 1 (a tied LM head's E^T, as insert-qdq quantizes
    it), zero point 0, and q · s within half a step of every table value. None when there is none."""
    values = np.asarray(table.values)
    if values.dtype != np.float32 or values.ndim != 2:
        return None
    rounded = json.loads(model.metadata.get(ROUNDED_FROM_KEY, "{}"))
    for node in model.graph.nodes:
        found = _rows_of(node, values.shape)
        if found is not None and (_holds(values, *found) or _rounded_from(rounded, values, *found)):
            return found
    return None


def _rounded_from(rounded: dict[str, str], values: np.ndarray, q: gs.Constant, scales: gs.Constant,
                  axis: int) -> bool:
    """Whether q is gptq's rounding of this very table (insert-qdq's record, ROUNDED_FROM_KEY): not the nearest
    steps, so _holds cannot tell, but a quantization of the table all the same (quant-gptq on a tied LM stored the
    table twice: 116 KB, the float model's size, against 82 KB; logits SQNR 36.2 against 34.8 dB, as `quant`)."""
    wanted = rounded.get(q.name)
    return wanted is not None and values_digest(values if axis == 0 else values.T) == wanted


def _rows_of(node: gs.Node, shape: tuple[int, int]) -> tuple[gs.Constant, gs.Constant, int] | None:
    """The node's (q, scales, axis) when it is a DequantizeLinear of int8 constants, zero point 0, one scale per
    table row, shaped as the table or its transpose."""
    if node.op != "DequantizeLinear" or not is_default_domain(node) or len(node.inputs) < 2:
        return None
    q, scales = node.inputs[0], node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if not (isinstance(q, gs.Constant) and isinstance(scales, gs.Constant)) or q.dtype != np.int8 \
            or len(q.shape) != 2 or math.prod(scales.shape) != shape[0] or len(scales.shape) != 1:
        return None
    if zero is not None and (not isinstance(zero, gs.Constant) or np.any(np.asarray(zero.values))):
        return None
    axis = int(node.attrs.get("axis", 1)) % 2
    if tuple(q.shape) == tuple(shape) and axis == 0:
        return q, scales, 0
    if tuple(q.shape) == tuple(shape[::-1]) and axis == 1:
        return q, scales, 1
    return None


def _holds(values: np.ndarray, q: gs.Constant, scales: gs.Constant, axis: int) -> bool:
    """q · s within half a step of every table value, give or take float32's rounding of w / s (insert-qdq divides
    in float32: up to ~4e-6 of a step at 63 steps): the integers are the table's, rounded, not another weight of
    the same shape (whose values lie anywhere in their steps). gptq's rounding is not the nearest one: see
_rounded_from."""
    step = np.asarray(scales.values, np.float64).reshape(-1, 1)
    rows = np.asarray(q.values) if axis == 0 else np.asarray(q.values).T
    for start in range(0, len(rows), 4096):  # float64 copies of a chunk of rows, not of a 50k-token table
        part = slice(start, start + 4096)
        error = np.abs(rows[part].astype(np.float64) * step[part] - values[part].astype(np.float64))
        if np.any(error > step[part] * (0.5 + 1e-4)):
            return False
    return True
