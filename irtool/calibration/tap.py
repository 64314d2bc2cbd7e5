"""Run a model over calibration batches and hand chosen intermediate values to the caller.

The model is copied with the requested values added as graph outputs (typed from shape
inference), so ONNX Runtime computes them in the same run as the real outputs. Values are yielded
one batch at a time and never accumulated here: memory does not grow with the number of samples.

With `summary=M`, float tensors of known rank >= 2 are not copied out whole: the tapped graph reduces each
in ONNX Runtime to a Summary, and copying every activation out of the session instead (ResNet-50: ~106 MB
per sample) cost 3-4x the float inference itself. A Summary holds
  high    the maximum;
  low     the minimum, except for the output of a Relu, Sigmoid or Softmax, or of a Clip with a constant minimum
          c >= 0, where it is that bound (0 or c) without a reduction: quantization ranges always include zero,
          so the exact minimum of such a tensor never matters, and skipping it saves a full read of the tensor;
  finite  False when the tensor holds an infinity (seen in its max or min) or a NaN. A NaN is looked for only
          in outputs of ops that can make one from finite inputs (not in NAN_FREE: Log, Sqrt, Div, Pow, ...);
          the others can only overflow, and an infinity shows in the max or min of the tensor where it
          appears, if that tensor is observed;
  sample  for M > 0, about M values per sample at fixed positions (observers.subsample).
With `sample_extremes` (histogram methods), tensors other than graph inputs and those named `exact` get no
min/max reduction: their extremes are the sample's, which the histogram takes in the pass that counts the sample (high
is None and low holds the floor above, -inf for none), and an infinity outside the sample shows only through
the NaN check's sum. A histogram threshold lies within the sample's extremes anyway, so the exact extremes only
decided the range where a threshold exceeded them; the reductions cost the ViT of bench/quant_bench.py about a
fifth of its float inference. `calibrate` names as `exact` the tensors it does not clip (probabilities, logits),
whose few extreme values decide what they mean and which a sample misses.
Other tensors (other dtypes, unknown rank; with M > 0 also [N, C, H, W] tensors with a dynamic C, H or W)
are tapped whole and summarized in numpy by `summarize`, which takes the exact minimum and checks every value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from irtool.calibration.data import batch_rows
from irtool.calibration.observers import row_indices, spatial_stride, subsample
from irtool.calibration.schedule import (
    MIN_RENUMBERED_SHARE,
    build_while_reading,
    calibration_session,
    session_with_weights,
)
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types
from irtool.ir.topo import outer_uses, topo_order

if TYPE_CHECKING:  # the engine and reference.py import this module
    from irtool.calibration.engine import Timings
    from irtool.calibration.reference import Recorder

log = logging.getLogger(__name__)


def tapped_proto(model: Model, names: list[str], weights: dict | None = None) -> onnx.ModelProto:
    """The model with `names` as extra outputs; `weights`: see Model.to_proto."""
    proto = model.to_proto(weights)
    types = infer_types(proto)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name in existing:
            continue
        _add_output(proto.graph, name, types)
    return proto


def _add_output(graph: onnx.GraphProto, name: str, types: Mapping) -> None:
    """Make `name` a graph output, typed as shape inference found it (float when it found nothing)."""
    elem = types.get(name, (onnx.TensorProto.FLOAT, None))[0] or onnx.TensorProto.FLOAT
    graph.output.append(helper.make_tensor_value_info(name, elem, None))


def fit_batches(inputs: list, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Mapping[str, np.ndarray]]:
    """The batches, split to the batch size the model's inputs (its NodeArgs) fix when they hold a multiple of it.
    fold-constants pins an --input-shape on the model when it folds a Shape for it, which happens in the pipeline
    after the calibration data were batched (by 8: input_ids [8, 12] against a declared [1, 12]); statistics are
    per sample, so the batching does not change them. Anything else goes on to `_feeds`, which names the mismatch."""
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)}
    size = fixed.pop() if len(fixed) == 1 else None
    for batch in batches:
        rows = batch_rows(batch)
        if not size or rows == size or rows % size:
            yield batch
            continue
        for start in range(0, rows, size):
            yield {name: value[start:start + size] if np.ndim(value) and len(value) == rows else value
                   for name, value in batch.items()}


def _feeds(inputs: list, batch: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """The session's inputs (its NodeArgs) from one calibration batch; a missing input, or a batch whose shape
    the model's declared dims refuse, is the caller's error, named in one line."""
    missing = [i.name for i in inputs if i.name not in batch]
    if missing:
        raise InputError(f"calibration batch {index} lacks model input(s) {', '.join(missing)}")
    feeds = {i.name: np.asarray(batch[i.name]) for i in inputs}
    for arg in inputs:
        shape, fixed = feeds[arg.name].shape, [d if isinstance(d, int) else None for d in arg.shape or []]
        if len(fixed) == len(shape) and any(d is not None and d != n for d, n in zip(fixed, shape, strict=True)):
            hint = " (--calib-batch-size sets the batch)" if fixed[0] not in (None, shape[0]) else ""
            raise InputError(f"calibration batch {index}: input {arg.name!r} has shape {list(shape)}, the model "
                             f"declares {['?' if d is None else d for d in fixed]}{hint}")
    return feeds


@dataclass
class Summary:
    """What calibration needs of one tensor over one batch."""

    low: float   # the minimum; for a Relu/Clip output, the bound its producer sets (see the module docstring)
    high: float | None  # None: the extremes are the sample's, left to its histogram (`sample_extremes`)
    finite: bool
    sample: np.ndarray | None = None  # [batch, k] subsample (observers.subsample), when asked for


def summarize(value: np.ndarray, max_per_sample: int, grid: bool | None = None) -> Summary:
    """The numpy reference of the in-graph summary (`grid`: as observers.subsample)."""
    if not value.size:
        return Summary(math.inf, -math.inf, True, value.reshape(0) if max_per_sample else None)
    finite = bool(np.all(np.isfinite(value)))
    sample = subsample(value, max_per_sample, grid) if max_per_sample else None
    return Summary(float(value.min()), float(value.max()), finite, sample)


# Ops that cannot make a NaN out of finite inputs: at worst they overflow to an infinity, which the max or min
# of that tensor shows. Their outputs skip the NaN reduction (a full extra read of the tensor).
NAN_FREE = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose", "Erf", "Flatten", "Gelu",
    "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "MatMul",
    "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Split", "Squeeze", "Sub", "Tanh",
    "Transpose", "Unsqueeze"})


# Producers whose [N, C, H, W] outputs ONNX Runtime keeps in its blocked conv layout (NCHWc), where pooling
# runs directly and a Slice or Reshape first converts the tensor back.
NCHWC_PRODUCERS = frozenset({"Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv",
                             "GlobalAveragePool", "MaxPool", "Relu", "Sigmoid", "Sum", "Tanh"})


@dataclass(frozen=True)
class _Taps:
    """Output names of one tensor's in-graph summary; the reductions are per sample or per channel, and
    tap() finishes them in numpy."""

    high: str | None         # None: the extremes come from the sample (tap's `sample_extremes`)
    low: str | None          # None: the tensor's producer bounds it below by `floor`, or as for `high`
    nan: str | None          # None: the producer is NaN-free on finite inputs
    sample: str | None
    floor: float = -math.inf

    def outputs(self) -> list[str]:
        return [out for out in (self.high, self.low, self.nan, self.sample) if out]


def _summarized_proto(model: Model, names: list[str], max_per_sample: int, sample_extremes: bool = False,
                      weights: dict | None = None,
                      exact: Collection[str] = ()) -> tuple[onnx.ModelProto, list[str], dict[str, _Taps]]:
    """A copy of the model whose extra outputs summarize the tensors in `names`; returns (proto, names tapped
    whole, {name: its summary outputs}). With `sample_extremes` (and max_per_sample > 0) the tensors other than
    graph inputs and `exact` get no min/max reduction: their extremes are the sample's. `weights`: see
    Model.to_proto."""
    proto = model.to_proto(weights)
    types = infer_types(proto)
    opset = _opset(proto)
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = _constants(graph)
    builder = _SummaryBuilder(graph, opset, max_per_sample)
    inputs = {i.name for i in graph.input}
    whole, reduced, added = [], {}, {}
    existing = {o.name for o in graph.output}
    for i, name in enumerate(names):
        elem, dims = types.get(name, (None, None))
        if (elem != onnx.TensorProto.FLOAT or dims is None or len(dims) < 2 or opset < 13 or 0 in dims
                or (max_per_sample and not _sampleable(dims))):  # empty tensors: pooling over nothing is undefined
            whole.append(name)
            continue
        producer = producers.get(name)
        floor = _lower_bound(producer, constants)
        nan_free = producer is None or producer.op_type in NAN_FREE  # graph inputs are checked as they stream
        reduce = not (sample_extremes and max_per_sample) or name in inputs or name in exact
        added[name], reduced[name] = builder.summary(f"__irtool_tap{i}", name, dims,
                                                     producer.op_type if producer else "", floor, nan_free, reduce)
    _place_after_producers(graph, added)
    for name in whole:
        if name not in existing:
            _add_output(graph, name, types)
    return proto, whole, reduced


def _sampleable(dims: list) -> bool:
    """Whether the graph can take observers.subsample of a tensor of these inferred dims: the rule depends on
    C, H, W of [N, C, H, W] tensors and on the last dim of other ranks >= 3, so those must be static."""
    if len(dims) == 4:
        return _static_count(dims[1:]) is not None
    return len(dims) < 3 or _static_count(dims[-1:]) is not None


def _static_count(dims: list) -> int | None:
    """The number of elements of these dims, or None when one is not a known positive integer."""
    if all(isinstance(d, int) and d > 0 for d in dims):
        return math.prod(dims)
    return None


class _SummaryBuilder:
    """Nodes that summarize one tensor. [N, C, H, W] tensors are reduced by GlobalMaxPool/GlobalAveragePool
    and subsampled by a strided 1x1 AveragePool: ONNX Runtime runs those on the blocked layout its convs
    produce, where a Reshape or Reduce first converts the whole tensor back to NCHW (MobileNetV2, 64 samples:
    1.20x the float run against 1.48x); the pooled sample is a grid only where the producer makes that layout.
    Other tensors are flattened per sample ([batch, n]) and reduced over axis 1, which ONNX Runtime
    parallelizes (a reduction to one scalar it does not); their samples are gathered rows."""

    def __init__(self, graph: onnx.GraphProto, opset: int, max_per_sample: int):
        self.graph, self.opset, self.max_per_sample = graph, opset, max_per_sample
        self._consts: dict[str, str] = {}

    def summary(self, t: str, name: str, dims: list, producer_op: str, floor: float,
                nan_free: bool, reduce: bool = True) -> tuple[list[onnx.NodeProto], _Taps]:
        nodes: list[onnx.NodeProto] = []
        flat = None

        def flattened() -> str:
            nonlocal flat
            if flat is None:
                flat = f"{t}_flat"
                nodes.append(helper.make_node("Reshape", [name, self._const("flat", [0, -1])], [flat]))
            return flat

        pooled = len(dims) == 4
        taps = _Taps(high=f"{t}_max" if reduce else None, low=None if floor > -math.inf or not reduce else f"{t}_min",
                     nan=None if nan_free else f"{t}_nan", sample=f"{t}_sample" if self.max_per_sample else None,
                     floor=floor)
        if taps.high:
            nodes.append(helper.make_node("GlobalMaxPool", [name], [taps.high]) if pooled
                         else self._reduce("ReduceMax", flattened(), taps.high))
        if taps.nan:  # ReduceMin/Max drop NaN (so does GlobalMaxPool); a sum or a mean does not.
            nodes.append(helper.make_node("GlobalAveragePool", [name], [taps.nan]) if pooled
                         else self._reduce("ReduceSum", flattened(), taps.nan))
        if taps.low:
            # Costs a conversion to NCHW on the blocked layout, hence skipped where the producer bounds it.
            nodes.append(self._reduce("ReduceMin", flattened(), taps.low))
        if taps.sample:
            nodes += self._sample(t, name, dims, producer_op, flattened, taps.sample)
        for out in taps.outputs():
            self.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        return nodes, taps

    def _sample(self, t: str, name: str, dims: list, producer_op: str, flattened, out: str) -> list[onnx.NodeProto]:
        """The subsample of observers.subsample (grid for the conv layout), for the shapes `_sampleable` admits."""
        m = self.max_per_sample
        if len(dims) == 4 and producer_op in NCHWC_PRODUCERS:  # on the blocked layout, without converting it back
            stride = spatial_stride(*dims[1:], m)
            return [helper.make_node("AveragePool", [name], [out], kernel_shape=[1, 1], strides=[stride, stride])]
        if len(dims) >= 3 and dims[-1] <= m:
            if len(dims) == 3:  # already [batch, rows, row]
                return self._strided(t, name, m // dims[-1], out, _static_count(dims[1:-1]))
            rows = f"{t}_rows"
            reshape = helper.make_node("Reshape", [name, self._const(f"rows{dims[-1]}", [0, -1, dims[-1]])], [rows])
            period = dims[2] if len(dims) == 4 else 1  # static: _sampleable
            return [reshape, *self._strided(t, rows, m // dims[-1], out, _static_count(dims[1:-1]), period)]
        return self._strided(t, flattened(), m, out, _static_count(dims[1:]))

    def _strided(self, t: str, x: str, keep: int, out: str, count: int | None,
                 period: int = 1) -> list[onnx.NodeProto]:
        """The entries observers.row_indices(k, keep, period) of axis 1 of x ([batch, k, ...]), k = `count`; or,
        when that is None (dynamic dims, never with a period), every ceil(k / keep)-th, k read at run time."""
        if count is not None:  # one node instead of six: the ViT's tapped graph builds ~25% faster
            # A Gather of whole rows copies them as blocks, where a strided Slice ran ~1.5x slower.
            indices = self._const(f"rows{count}keep{keep}period{period}",
                                  row_indices(count, keep, period).tolist())
            return [helper.make_node("Gather", [x, indices], [out], axis=1)]
        one = self._const("one", [1])
        return [helper.make_node("Shape", [x], [f"{t}_shape"]),
                helper.make_node("Slice", [f"{t}_shape", one, self._const("two", [2])], [f"{t}_k"]),
                helper.make_node("Add", [f"{t}_k", self._const(f"keep{keep}-1", [keep - 1])], [f"{t}_k1"]),
                helper.make_node("Div", [f"{t}_k1", self._const(f"keep{keep}", [keep])], [f"{t}_div"]),
                helper.make_node("Max", [f"{t}_div", one], [f"{t}_stride"]),  # k = 0: step 1
                helper.make_node("Slice", [x, self._const("zero", [0]), self._const("big", [2**62]), one,
                                           f"{t}_stride"], [out])]

    def _const(self, key: str, values: list[int]) -> str:
        if key not in self._consts:
            name = f"__irtool_tap_{key}"
            self.graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, np.int64), name))
            self._consts[key] = name
        return self._consts[key]

    def _reduce(self, op: str, x: str, out: str) -> onnx.NodeProto:
        """A reduction over axis 1, keepdims=0; axes became an input in opset 13 (ReduceSum) / 18 (Min, Max)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return helper.make_node(op, [x, self._const("axis1", [1])], [out], keepdims=0)
        return helper.make_node(op, [x], [out], axes=[1], keepdims=0)


def _phase_means(graph: onnx.GraphProto, phases: Phases, out: str, opset: int) -> list[onnx.NodeProto]:
    """Nodes that write to `out` the per-sample channel means [N, C·s^r, 1, ...] of the phase layout of
    phases.source [N, C, D1·s, ...]: per spatial axis, last first, a Reshape splits it into (positions, s) and a
    ReduceMean averages the positions away. Means of equal-sized parts, so the mean of every phase's values; no
    static shape needed (Reshape's 0 and -1)."""
    nodes, current, s, r = [], phases.source, phases.stride, phases.rank
    for k in range(r, 0, -1):
        shape = numpy_helper.from_array(np.array([0] * (k + 1) + [-1, s] + [s] * (r - k), np.int64), f"{out}_shape{k}")
        graph.initializer.append(shape)
        nodes.append(helper.make_node("Reshape", [current, shape.name], [f"{out}_split{k}"]))
        current = f"{out}_phase{k}"
        nodes.append(_reduction(graph, "ReduceMean", f"{out}_split{k}", current, [k + 1], opset))
    flat = numpy_helper.from_array(np.array([0, -1] + [1] * r, np.int64), f"{out}_flat")
    graph.initializer.append(flat)
    nodes.append(helper.make_node("Reshape", [current, flat.name], [out]))
    return nodes


def _reduction(graph: onnx.GraphProto, op: str, x: str, out: str, axes: list[int], opset: int) -> onnx.NodeProto:
    """`op` (ReduceSum, ReduceMean, ReduceMax, ...) over `axes`, keepdims=0; axes became an input in opset 13
    (ReduceSum) / 18 (the others), then held in an initializer named after `out`."""
    if opset < (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x], [out], axes=axes, keepdims=0)
    held = numpy_helper.from_array(np.array(axes, np.int64), f"{out}_axes")
    graph.initializer.append(held)
    return helper.make_node(op, [x, held.name], [out], keepdims=0)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small constant tensors (initializers and Constant outputs) by name."""
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer
              if np.prod(init.dims, dtype=np.int64) <= 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return arrays


# Ops whose outputs are never negative (Softmax: the ViT's attention probabilities, 12 tensors of 7.5 MB a batch).
NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax"})


def _lower_bound(producer: onnx.NodeProto | None, constants: Mapping[str, np.ndarray]) -> float:
    """The lower bound a Relu, Sigmoid, Softmax or a Clip with a constant non-negative minimum puts on its output,
    else -inf. Quantization ranges always include zero, so the true minimum of such a tensor never matters."""
    if producer is None:
        return -math.inf
    if producer.op_type in NON_NEGATIVE_OPS:
        return 0.0
    if producer.op_type != "Clip":
        return -math.inf
    attrs = {a.name: a for a in producer.attribute}
    if "min" in attrs:  # opset < 11
        low = attrs["min"].f
    elif len(producer.input) > 1 and producer.input[1] in constants and constants[producer.input[1]].size == 1:
        low = float(constants[producer.input[1]].reshape(()))
    else:
        return -math.inf
    return low if low >= 0.0 else -math.inf


def _nchwc_share(proto: onnx.ModelProto) -> float:
    """The share of summary nodes that pool a tensor in ONNX Runtime's blocked conv layout: the ones its NCHWc
    transformer will replace (irtool.calibration.schedule)."""
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    summary = [n for n in proto.graph.node if n.output and n.output[0].startswith("__irtool_tap")]
    pooled = [n for n in summary if n.op_type in ("GlobalMaxPool", "GlobalAveragePool", "AveragePool")
              and producers.get(n.input[0]) in NCHWC_PRODUCERS]
    return len(pooled) / max(1, len(summary))


def _place_after_producers(graph: onnx.GraphProto, added: Mapping[str, list[onnx.NodeProto]]) -> None:
    """Put each tensor's summary nodes right after the node producing it, so it is reduced while hot.
    Appended at the end of the graph instead, the tapped ResNet-50 ran about 2x slower (8.3 vs 4.3 s per
    batch of 16, measured on a shared machine)."""
    produced = {out for node in graph.node for out in node.output}
    nodes = [n for name, extra in added.items() if name not in produced for n in extra]
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            nodes.extend(added.get(out, ()))
    del graph.node[:]
    graph.node.extend(nodes)


def tap(model: Model, names: list[str], batches: Iterable[Mapping[str, np.ndarray]],
        threads: int | None = None, summary: int | None = None, sample_extremes: bool = False,
        timings: Timings | None = None, exact: Collection[str] = (), recorder: Recorder | None = None
        ) -> Iterator[dict]:
    """Yield {name: value} for each batch, for the requested value names; with `summary=M` (M values per
    sample at most, 0 for none) yield {name: Summary} instead (see the module docstring), and with
    `sample_extremes` too, take the extremes of tensors other than graph inputs and `exact` from their sample.
    `timings` gets the time spent waiting for the session (built while the first batches are read) added to
    its `session`. A `recorder` (with `summary` only) is fed each batch with the reductions of its request's
    values and the model outputs (reference.py)."""

    def build() -> tuple[ort.InferenceSession, list[str], dict[str, _Taps], dict[str, _Reduced]]:
        weights: dict = {}
        if summary is None:
            proto = tapped_proto(model, names, weights)
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            return session_with_weights(proto, options, weights), list(names), {}, {}
        proto, whole, reduced = _summarized_proto(model, names, summary, sample_extremes, weights, exact)
        pooled = pool_values(proto, recorder.request.axes, "__irtool_ref", recorder.phases) \
            if recorder is not None else {}
        session = calibration_session(proto, [t.name for t in model.graph.outputs], threads,
                                      may_renumber=_nchwc_share(proto) >= MIN_RENUMBERED_SHARE, weights=weights)
        return session, whole, reduced, pooled  # the proto goes: the session holds what it needs

    (session, whole, reduced, pooled), batches, waited = build_while_reading(build, batches)
    if timings is not None:
        timings.session += waited
    inputs = session.get_inputs()
    fetch = whole + [out for taps in reduced.values() for out in taps.outputs()]
    if recorder is not None and summary is not None:
        fetch += [out for name in recorder.request.axes for out in reduced_outputs(name, pooled.get(name))]
        fetch += recorder.outputs
        fetch = list(dict.fromkeys(fetch))
    for index, batch in enumerate(fit_batches(inputs, batches)):
        feeds = _feeds(inputs, batch, index)
        # ONNX Runtime returns every output when asked for none (a model with nothing to observe).
        values = dict(zip(fetch, session.run(fetch, feeds) if fetch else [], strict=True))
        if recorder is not None and summary is not None:
            recorder.add(batch, values, pooled)
        if summary is None:
            result = {name: values[name] for name in names}
            del values  # as below: the consumer's dict alone keeps this batch
            yield result
            continue
        out = {name: summarize(values.pop(name), summary) for name in whole}
        out.update({name: _finish(taps, values) for name, taps in reduced.items()})
        result = {name: out[name] for name in names}
        del values, out  # only `result` keeps this batch's outputs, so a consumer that empties it frees them
        yield result


def _finish(taps: _Taps, values: Mapping[str, np.ndarray]) -> Summary:
    """One Summary from a tensor's per-sample (or per-channel) reductions, or from its sample alone."""
    sample = values[taps.sample] if taps.sample else None
    if sample is not None:
        sample = sample.reshape(len(sample), -1)
    if taps.high is None:
        return _from_sample(taps, values, sample)
    highs = values[taps.high]
    if not highs.size:
        return Summary(math.inf, -math.inf, True, sample)
    high = float(highs.max())
    low = float(values[taps.low].min()) if taps.low else taps.floor
    finite = math.isfinite(low) and math.isfinite(high) and not (taps.nan and np.isnan(values[taps.nan]).any())
    return Summary(low, high, finite, sample)


def _from_sample(taps: _Taps, values: Mapping[str, np.ndarray], sample: np.ndarray) -> Summary:
    """The sample without extremes: the histogram that counts it takes them in the same pass
    (Histogram.add_sample). An infinity elsewhere in the tensor shows only through the NaN flag's sum, for the
    producers that have one."""
    finite = not (taps.nan and not np.isfinite(values[taps.nan]).all())
    return Summary(taps.floor, None, finite, sample)


def channel_means(model: Model, axes: Mapping[str, int],
                  batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean of each named value over everything but its channel axis, over all batches (float64 sums,
    streamed: one batch in memory at a time). Float values [N, C, ...] with channel axis 1 (conv inputs) are
    averaged per sample inside ONNX Runtime by a GlobalAveragePool, which runs on its blocked conv layout;
    with every one copied out whole, bias-correct took 2.8 s on the bench's MobileNetV2 at 64 samples (1.2 s
    now, ~2.5x its float inference). [N, ..., C] float values with the channel last (token sequences) are summed
    over their middle axes in the graph the same way. Other values come out whole."""
    return {name: mean_of(parts) for name, parts in channel_batch_sums(model, axes, batches).items()}


def mean_of(parts: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
    """The mean of (per-channel sum, count) parts, summed in their order."""
    total, count = 0.0, 0
    for part_sum, part_count in parts:
        total, count = total + part_sum, count + part_count
    return total / max(1, count)


def channel_batch_sums(model: Model, axes: Mapping[str, int], batches: Iterable[Mapping[str, np.ndarray]],
                       outputs: Callable[[dict[str, np.ndarray]], None] | None = None
                       ) -> dict[str, list[tuple[np.ndarray, int]]]:
    """channel_means' sums, per batch: {name: [(per-channel float64 sum, values summed per channel), ...]}, so a
    caller can take the mean over the first batches alone (bias-correct{mode=empirical} under its memory bound).
    Given `outputs`, it is called with each batch's model outputs ({name: value}): the reference of an output
    SQNR, from the same pass."""
    if not axes:  # ONNX Runtime would return every output for an empty list of names
        return {}

    def build() -> tuple[ort.InferenceSession, dict[str, _Reduced]]:
        weights: dict[str, np.ndarray] = {}
        proto, reduced = pooled_proto(model, axes, weights)
        may_renumber = _nchwc_share(proto) >= MIN_RENUMBERED_SHARE
        return calibration_session(proto, [t.name for t in model.graph.outputs], may_renumber=may_renumber,
                                   weights=weights), reduced

    (session, reduced), batches, _ = build_while_reading(build, batches)
    names = sorted(axes)
    fetch = [out for name in names for out in reduced_outputs(name, reduced.get(name))]
    returned = [t.name for t in model.graph.outputs] if outputs is not None else []
    fetch += [name for name in returned if name not in fetch]
    inputs = session.get_inputs()
    unbatched = batch_free(model, names)
    parts: dict[str, list[tuple[np.ndarray, int]]] = {name: [] for name in names}
    for index, batch in enumerate(fit_batches(inputs, batches)):
        values = dict(zip(fetch, session.run(fetch, _feeds(inputs, batch, index)), strict=True))
        if returned:
            outputs({name: values[name] for name in returned})
        rows = batch_rows(batch)
        for name in names:
            total, count = channel_sums(values, name, axes[name], reduced.get(name))
            weight = rows if name in unbatched else 1  # computed once for the batch's samples, which share it
            parts[name].append((total * weight, count * weight))
        del values  # freed before the next batch runs
    if not parts[names[0]]:
        raise InputError("calibration data is empty")
    return parts


def detached(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of ONNX Runtime's outputs, for a caller that keeps them: a returned array is a view of memory the
    session's allocator owns, and holding it kept that allocator's arena alive after the session was gone (on
    bench/highres_bench.py's U-Net, 256 MB of kept float outputs held 2.7 GB)."""
    return {name: np.array(value) for name, value in values.items()}


def batch_free(model: Model, names: Iterable[str]) -> set[str]:
    """The named values computed from scalar inputs and constants alone (a diffusion timestep's embedding): a
    batch holds one for all its samples, which calibration groups by their scalar values."""
    batched = {t.name for t in model.graph.inputs if t.shape is None or len(t.shape)}
    nodes = model.graph.nodes
    for node in (nodes[i] for i in topo_order(nodes)):
        if any(t.name in batched for t in outer_uses(node)):
            batched.update(t.name for t in node.outputs)
    return {name for name in names if name not in batched}


def channel_abs_max(model: Model, names: Iterable[str],
                    batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |value| of each named float value per channel of its last axis, over every other axis and all batches
    (ReduceMax(Abs) in the graph, so only [C] per value and batch leaves ONNX Runtime)."""
    names = sorted(set(names))
    if not names:
        return {}
    weights: dict[str, np.ndarray] = {}
    proto = model.to_proto(weights)
    types = infer_types(proto)
    outputs = {}
    for i, name in enumerate(names):
        elem, dims = types.get(name, (None, None))
        if elem not in _POOLABLE or not dims:
            raise InputError(f"channel_abs_max: {name!r} is not a float value of known rank")
        outputs[name] = f"__irtool_absmax{i}"
        reduce = _reduction(proto.graph, "ReduceMax", f"{outputs[name]}_abs", outputs[name],
                            list(range(len(dims) - 1)), model.opset)
        proto.graph.node.extend([helper.make_node("Abs", [name], [f"{outputs[name]}_abs"]), reduce])
        proto.graph.output.append(helper.make_tensor_value_info(outputs[name], elem, None))
    session = calibration_session(proto, [t.name for t in model.graph.outputs], may_renumber=False, weights=weights)
    inputs, found = session.get_inputs(), {}
    fetch = [outputs[name] for name in names]
    for index, batch in enumerate(fit_batches(inputs, batches)):
        for name, value in zip(names, session.run(fetch, _feeds(inputs, batch, index)), strict=True):
            found[name] = np.maximum(found[name], value) if name in found else value.astype(np.float64)
    if not found:
        raise InputError("calibration data is empty")
    return found


_POOLABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def reduced_outputs(name: str, reduced: _Reduced | None) -> list[str]:
    if reduced is None:
        return [name]
    return [out for out in (reduced.mean, reduced.sums, reduced.shape) if out]


def channel_sums(values: Mapping[str, np.ndarray], name: str, axis: int,
                  reduced: _Reduced | None) -> tuple[np.ndarray, int]:
    """(per-channel sum, number of values summed per channel) of one batch of `name`."""
    if reduced is not None and reduced.sums:
        shape = values[reduced.shape]
        return values[reduced.sums].astype(np.float64).sum(axis=0), int(np.prod(shape[:-1]))
    value = values[reduced.mean] if reduced is not None else values[name]
    axis = 1 if reduced is not None else axis % value.ndim
    other = tuple(i for i in range(value.ndim) if i != axis)
    return value.astype(np.float64).sum(axis=other), math.prod(value.shape[i] for i in other)


def sample_channel_sums(values: Mapping[str, np.ndarray], name: str, axis: int, reduced: _Reduced | None,
                        rows: int) -> tuple[np.ndarray, int] | None:
    """channel_sums per sample of a batch of `rows` samples: ([rows, C] sums, values summed per channel and
    sample), or None when the value's first axis is not the batch's (a value reshaped to [tokens, C])."""
    if reduced is not None and reduced.sums:
        shape = values[reduced.shape]
        if len(shape) < 2 or shape[0] != rows:
            return None
        return values[reduced.sums].astype(np.float64), int(np.prod(shape[1:-1]))
    value = values[reduced.mean] if reduced is not None else values[name]
    axis = 1 if reduced is not None else axis % max(value.ndim, 1)
    if value.ndim < 2 or axis == 0 or value.shape[0] != rows:
        return None
    other = tuple(i for i in range(1, value.ndim) if i != axis)
    return value.astype(np.float64).sum(axis=other), math.prod(value.shape[i] for i in other)


@dataclass(frozen=True)
class Phases:
    """How a value that a model holds as another's phases is reduced (passes/deconv.float_copy: a phase Conv's
    output, which the restored ConvTranspose computes interleaved): channel c·s^r + phase of the value holds the
    values of channel c of `source` [N, C, ...] at that phase (stride s along each of its r spatial axes)."""

    source: str
    stride: int
    rank: int


@dataclass(frozen=True)
class _Reduced:
    """In-graph reductions of one value for channel_means: `mean` per sample and channel ([N, C, 1, 1], conv
    layout), or `sums` over the middle axes ([N, C], tokens) with the value's `shape` to count them."""
    mean: str | None = None
    sums: str | None = None
    shape: str | None = None


def pooled_proto(model: Model, axes: Mapping[str, int], weights: dict) -> tuple[onnx.ModelProto, dict[str, _Reduced]]:
    """The model with a GlobalAveragePool after each float value of rank >= 3 whose channel axis is 1, a
    ReduceSum over the middle axes of each one of rank >= 3 whose channel axis is the last (tokens: a
    transformer's linear layers), and those reductions and the other named values as outputs; returns
    (proto, {value name: its reductions}). Copied out whole, the bench ViT's 72 token tensors made bias-correct
    take 1.3-1.4 s at 64 samples."""
    proto = model.to_proto(weights)
    return proto, pool_values(proto, axes)


def pool_values(proto: onnx.ModelProto, axes: Mapping[str, int], prefix: str = "__irtool_tap",
                phases: Mapping[str, Phases] | None = None) -> dict[str, _Reduced]:
    """Add pooled_proto's reductions (named `prefix`...) and outputs to `proto`; returns {value name: its
    reductions}. A value in `phases` (channel axis 1) is not in `proto`: its per-sample channel means are taken
    from its source."""
    types = infer_types(proto)
    graph = proto.graph
    existing = {o.name for o in graph.output}
    reduced, added = {}, {}
    phases = phases or {}
    for i, name in enumerate(sorted(axes)):
        if name in phases:
            reduced[name] = _Reduced(mean=f"{prefix}{i}_mean")
            added.setdefault(phases[name].source, []).extend(
                _phase_means(graph, phases[name], reduced[name].mean, _opset(proto)))
            elem = types.get(phases[name].source, (None, None))[0] or onnx.TensorProto.FLOAT
            graph.output.append(helper.make_tensor_value_info(reduced[name].mean, elem, None))
            continue
        elem, dims = types.get(name, (None, None))
        rank = len(dims) if dims is not None else 0
        # float16 sums over hundreds of tokens lose digits or overflow: such values come out whole.
        token_sums = elem != onnx.TensorProto.FLOAT16 and axes[name] % max(rank, 1) == rank - 1
        if elem not in _POOLABLE or rank < 3 or not (axes[name] % rank == 1 or token_sums):
            if name not in existing:
                _add_output(graph, name, types)
            continue
        if axes[name] % rank == 1:
            reduced[name] = _Reduced(mean=f"{prefix}{i}_mean")
            added.setdefault(name, []).append(helper.make_node("GlobalAveragePool", [name], [reduced[name].mean]))
        else:
            middle = numpy_helper.from_array(np.arange(1, rank - 1, dtype=np.int64), f"{prefix}{i}_axes")
            graph.initializer.append(middle)
            reduced[name] = _Reduced(sums=f"{prefix}{i}_sums", shape=f"{prefix}{i}_shape")
            added.setdefault(name, []).extend([
                helper.make_node("ReduceSum", [name, middle.name], [reduced[name].sums], keepdims=0),
                helper.make_node("Shape", [name], [reduced[name].shape])])
        for out in (reduced[name].mean, reduced[name].sums):
            if out:
                graph.output.append(helper.make_tensor_value_info(out, elem, None))
        if reduced[name].shape:
            graph.output.append(helper.make_tensor_value_info(reduced[name].shape, onnx.TensorProto.INT64, None))
    _place_after_producers(graph, added)
    return reduced
