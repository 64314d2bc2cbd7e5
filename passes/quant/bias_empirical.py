"""bias-correct{mode=empirical}: each layer's output mean measured in the quantized model, layer by layer.

The analytic correction (bias_correct.py) cancels the shift that a layer's own weight rounding causes, with the
float model's input means. A quantized model's layers also see shifted inputs: quantization noise rectified by the
ReLUs and clips before them, activation rounding, upstream layers' shifts carried through nonlinearities. This
mode measures what the deployed model computes instead: with the Q/DQ of `insert-qdq` in place (a private copy),
it takes the layers in topological order and sets each one's bias so that its output mean per channel, over the
calibration samples, equals the float model's. Upstream layers are corrected before a layer is measured, so no
shift is counted twice. On the test suite's trained digits nets (logit SQNR, mean of seeds 0-2, the first 64 of
300 calibration images, evaluated on 497 others): MobileNet-like 28.79 dB plain INT8, 31.46 analytic, 34.91
empirical; plain CNN 43.16, 43.71, 44.87; residual 37.59, 38.20, 38.88; SiLU/squeeze-excitation net 27.60,
28.83, 29.48.

Cost: about one pass of the quantized model over the first `samples` calibration samples, run in pieces (one
ONNX Runtime session per layer, see Pieces), whose live values stay in memory, up to `memory-mb`: where the values
live between two layers would hold more, the layers from there on are measured on fewer samples (the first
batches), and the float means they are matched to are taken over the same samples. A U-Net at 512x512 (32-128
channels, 64 samples, batch 4) kept up to 1.5 GB of them, the bench models at 224x224 15-129 MB. ONNX
Runtime's working memory for the batch a piece runs comes on top, as in calibration. The float reference means,
and with min-sqnr the float model's outputs over those samples for the check (empirical_shifts), come from
calibrate's pass when calibrate runs just before (irtool.calibration.reference; stat `float_passes` 0), else from a
float pass of this one's. On bench/highres_bench.py's U-Net at 512x512 (64 samples, batches of 8) the pass took
23-25 s with its own float pass (11-13 s) and pieces 11.6 s, of which 1.4 s LinearMean's sums (48-53 s before the
check moved onto the corrected model, the pieces dropped the dequantizations no output reads and LinearMean summed
bands); about 11 s since calibrate takes the float pass. What it keeps of ONNX Runtime's outputs is copied
(tap.detached): the pieces' values held every piece session's arena, and the pass peaked at 5.4 GB there, 2.7 GB
since."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.calibration.data import batch_rows
from irtool.calibration.reference import FloatReference
from irtool.calibration.schedule import calibration_session
from irtool.calibration.tap import (
    batch_free,
    channel_batch_sums,
    channel_sums,
    detached,
    fit_batches,
    mean_of,
    pooled_proto,
    reduced_outputs,
)
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.skeleton import infer_types
from irtool.ir.topo import live_nodes, outer_uses, topo_order
from irtool.passes.quant.insert_qdq import BIAS_CORRECTION_KEY, KEPT_FLOAT_KEY, WEIGHT_ROUNDING_KEY, InsertQDQ
from irtool.passes.quant.sensitivity import float_outputs, streamed_sqnr
from irtool.passmanager import PassContext
from irtool.progress import bar

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]

log = logging.getLogger(__name__)


def channel_axis(tensor_owner: gs.Node) -> int:
    return 1 if tensor_owner.op == "Conv" else -1


def empirical_shifts(model: Model, layers: list[tuple[gs.Node, gs.Node, int]], quantize: InsertQDQ,
                     ctx: PassContext, data: Batches, memory_bytes: int) -> tuple[list[np.ndarray], dict]:
    """The bias change of each (layer, bias holder, input index) that makes its output mean in the model that
    `quantize` (an insert-qdq) makes equal the float one's, and stats: the samples read and those the last layer
    was measured on (fewer where the live values outgrew `memory_bytes`), the layers that insert-qdq left float by
    mixed precision, how many it quantized and were measured. Every layer has a bias (a constant input at the
    holder's index) already.
    With min-sqnr alone (the quant pipelines), every layer is quantized and corrected first, and the corrected
    model's output SQNR (stat `output_sqnr`) is checked: it is the model insert-qdq writes, and its outputs cost
    only the nodes after the last layer, the float ones a tap of the reference pass. It is taken over the samples
    the last layer was measured on whose float outputs also fit in `memory_bytes` (stat `samples_checked`): they
    are kept until the pieces are done (a 4-class segmentation head at 512x512: 4 MB per sample). Only when it
    falls short does insert-qdq's sweep decide, on the uncorrected model, which layers stay float, and the layers
    are measured again with those float. Before, insert-qdq's check ran its own float and INT8 passes first
    (over up to 128 samples): 21.5 of bias-correct's 53.2 s on bench/highres_bench.py's U-Net at 512x512."""
    measure = _Measure(model, layers, ctx, data, memory_bytes)
    o = quantize.options
    if o.min_sqnr is None or o.keep_fp:
        return measure.run(quantize)
    shifts, stats = measure.run(InsertQDQ(dataclasses.replace(o, min_sqnr=None)), check=True)
    reached = float(stats["output_sqnr"])
    if reached >= o.min_sqnr:
        ctx.logger.info("bias-correct: every layer quantized and corrected reaches %.1f dB >= min-sqnr=%s",
                        reached, o.min_sqnr)
        return shifts, stats
    ctx.logger.info("bias-correct: every layer quantized and corrected reaches %.1f dB < min-sqnr=%s: deciding "
                    "which layers stay float, then measuring again", reached, o.min_sqnr)
    return measure.run(quantize)


class _Measure:
    """One measurement of the layers' shifts (run) in a quantized copy of the model; the float reference means,
    taken in the first run (or by calibrate: reference.py), serve the next (the same first batches)."""

    def __init__(self, model: Model, layers: list[tuple[gs.Node, gs.Node, int]], ctx: PassContext, data: Batches,
                 memory_bytes: int):
        self.model, self.layers, self.ctx, self.data, self.memory_bytes = model, layers, ctx, data, memory_bytes
        # {value: [(per-channel sum, count), ...]}, each part over reference_rows[i] samples
        self.reference: dict[str, list[tuple[np.ndarray, int]]] | None = None
        self.reference_rows: list[int] = []
        self.float_passes = 0

    def run(self, quantize: InsertQDQ, check: bool = False) -> tuple[list[np.ndarray], dict]:
        trial = self.model.copy()
        trial.metadata.pop(KEPT_FLOAT_KEY, None)  # an earlier run's decision: this one decides again
        # All of insert-qdq: GELU fusion, the integer HardSwish, and which layers stay float change what is measured.
        kept = quantize.run(trial, self.ctx).stats["layers_kept_float"]
        pieces = Pieces(trial, self.data, self.memory_bytes, outputs=check)
        read = pieces.samples()
        layers = self.layers
        expected = self._reference(pieces, check)
        nodes = {n.name: n for n in trial.graph.nodes}
        # A layer insert-qdq leaves float (excluded) is not corrected: insert-qdq gives it its original bias back.
        shifts = [np.zeros_like(self.reference[biased_output(node, holder).name][0][0]) for node, holder, _ in layers]
        found = {k: _in_trial(nodes, node, holder, index) for k, (node, holder, index) in enumerate(layers)}
        spots = {k: spot for k, spot in found.items() if spot is not None}
        for k in bar(sorted(spots, key=lambda k: pieces.position(spots[k][0])), self.ctx.progress, "bias-correct",
                     "layer"):
            out, axis, (holder, index) = spots[k]
            node, float_holder, _ = layers[k]
            mean, batches = pieces.mean_until(out, axis)
            shift = -(mean - self._float_mean(biased_output(node, float_holder).name, pieces.samples(batches)))
            original = np.asarray(float_holder.inputs[layers[k][2]].values, np.float64).reshape(-1)
            shifts[k] = _shift_trial_bias(trial, holder, index, shift, original)
        stats = {"samples": read, "samples_last": pieces.samples(), "layers_measured": len(spots),
                 "layers_kept_float": kept, "float_passes": self.float_passes}
        if check:  # over the first batches that both the pieces and the float outputs kept
            quantized = pieces.outputs()  # run only as far as `expected` goes: zip stops at its end first
            pairs = (({name: ref[name] for name in out}, out) for ref, out in zip(expected, quantized, strict=False))
            sqnr = streamed_sqnr(pairs)
            stats["output_sqnr"] = round(sqnr, 2) if math.isfinite(sqnr) else str(sqnr)  # JSON has no inf
            stats["samples_checked"] = pieces.samples(len(expected))
        return shifts, stats

    def _reference(self, pieces: Pieces, outputs: bool) -> list[dict[str, np.ndarray]]:
        """Take the float reference means on the first run, over the pieces' samples, and return the float
        model's outputs over the first of them that fit in memory_bytes (one batch at least) when asked: from the
        same pass when the model holds its float weights and biases, else from float_outputs, which restores them
        on a copy (as for insert-qdq's check)."""
        kept: list[dict[str, np.ndarray]] = []
        size = 0

        def keep(values: dict[str, np.ndarray]) -> None:
            nonlocal size
            size += _nbytes(values)
            if not kept or size <= self.memory_bytes:
                kept.append(detached(values))

        restore = rounded(self.model)
        if self.reference is None:
            measured = {biased_output(node, holder).name: channel_axis(node) for node, holder, _ in self.layers}
            recorded = self.ctx.analysis(FloatReference, self.model)
            batches = list(pieces.batches())
            if recorded is not None and recorded.serves(measured, batches):
                log.info("bias-correct: the float means are calibrate's, taken in its pass")
                self.reference = {name: recorded.sums[name] for name in measured}
                self.reference_rows = [1] * len(recorded.prints)
                expected = recorded.output_batches(batch_rows(b) for b in batches) if not restore else []
                if expected or not outputs:
                    return expected
            else:
                tap = keep if outputs and not restore else None
                self.reference = channel_batch_sums(self.model, measured, batches, tap)
                self.reference_rows = [batch_rows(b) for b in batches]
                self.float_passes += 1
                if tap is not None:
                    return kept
        if outputs:
            self.float_passes += 1
            for values in float_outputs(self.model, dataclasses.replace(self.ctx, calibration_data=pieces.batches)):
                keep(values)
        return kept

    def _float_mean(self, name: str, samples: int) -> np.ndarray:
        """The float model's mean of a layer's output over the first `samples` samples."""
        parts, count = [], 0
        for part, rows in zip(self.reference[name], self.reference_rows, strict=True):
            if count >= samples:
                break
            parts.append(part)
            count += rows
        return mean_of(parts)


def rounded(model: Model) -> bool:
    """Whether the model holds weights or biases that are not its float ones (gptq's, an earlier correction's): its
    float outputs come from a copy with those restored (sensitivity.float_outputs)."""
    return BIAS_CORRECTION_KEY in model.metadata or WEIGHT_ROUNDING_KEY in model.metadata


def _weight_quantized(node: gs.Node) -> bool:
    weight = node.inputs[1]
    return bool(weight.inputs) and weight.inputs[0].op == "DequantizeLinear"


class Pieces:
    """Runs a model piece by piece over the first calibration samples: each call runs the nodes from the last cut
    up to a value's producer (the producer included, unless LinearMean gives its mean from its input) on the
    values live at that cut, kept in memory, and cuts again just before the producer, so the next call runs it
    again with what changed since (its corrected bias).
    Over all layers this is about one pass of the model, where a prefix per layer was about half a pass each
    (the bench's ResNet-50, 53 layers at 64 samples: 5.6 s in pieces, 20.5 s with prefixes, both before
    LinearMean).
    Nodes computed from constants alone (weight and bias DequantizeLinears) run in every piece that reads them.
    The values kept hold at most `memory_bytes` (and one batch at least): the batches past it are dropped, from the
    cut where they would have outgrown it."""

    def __init__(self, model: Model, data: Batches, memory_bytes: int, outputs: bool = False):
        self.model = model
        self.order = [model.graph.nodes[i] for i in topo_order(model.graph.nodes)]
        self.index = {id(n): i for i, n in enumerate(self.order)}
        self.static: dict[int, bool] = {}
        self.last_read: dict[str, int] = {}
        for i, node in enumerate(self.order):
            for tensor in outer_uses(node):
                self.last_read[tensor.name] = i
        if outputs:  # read after the last node, by outputs(): an output made early stays live
            self.last_read.update((t.name, len(self.order)) for t in model.graph.outputs)
        self.cut, self.memory_bytes = 0, memory_bytes
        self.batch_free = batch_free(model, [t.name for n in self.order for t in n.outputs])
        self.cache: list[dict[str, np.ndarray]] = []
        # Samples per batch, counted on the inputs: the values kept after a cut may be token rows ([N * T, C]).
        self.rows: list[int] = []
        size = 0
        # Every input, read or not: the float reference runs on these batches too. Copied: a source may reuse its
        # arrays.
        for batch in fit_batches(model.graph.inputs, data()):
            entry = {name: np.array(value) for name, value in batch.items()}
            size += _nbytes(entry)
            if self.cache and size > memory_bytes:
                log.info("bias-correct: the first %d samples fill memory-mb=%d: measuring on those",
                         self.samples(), memory_bytes // 2**20)
                break
            self.cache.append(entry)
            self.rows.append(batch_rows(entry))
        if not self.cache:
            raise InputError("calibration data is empty")

    def batches(self) -> Iterable[Mapping[str, np.ndarray]]:
        return iter(self.cache)

    def samples(self, batches: int | None = None) -> int:
        """The samples in the batches kept (in the first `batches` of them)."""
        return sum(self.rows[:batches])

    def position(self, tensor: gs.Tensor) -> int:
        return self.index[id(tensor.inputs[0])]

    def mean_until(self, out: gs.Tensor, axis: int) -> tuple[np.ndarray, int]:
        """Mean of `out` over everything but `axis`, over the cached samples, and how many batches it took (all
        that the values live at the new cut fit in memory_bytes for); then cut before its producer. A Conv or
        Gemm output is not computed for it: its mean follows from the layer's input, kept at the cut (see
        LinearMean), which saves running the layer in float once more (the layer runs, with its corrected bias,
        in the next piece)."""
        end = self.position(out)
        before, pulled = self._live(self.cut)
        after, pulled_after = self._live(end)
        linear = LinearMean.of(self.order[end], {n.outputs[0].name: n for n in pulled_after})
        kept = {t.name for t in before}
        fetched = [t for t in after if t.name not in kept]
        if linear is None:
            session, reduced = self._session(pulled + self._nodes(self.cut, end), before, fetched + [out], out, axis)
        else:
            nodes = self._nodes(self.cut, end - 1) if fetched else []
            session, reduced = self._session(pulled + nodes, before, fetched, None, axis) if nodes else (None, None)
        names = [t.name for t in fetched] + ([] if linear else reduced_outputs(out.name, reduced))
        sums, count, size = 0.0, 0, 0
        weight = out.name in self.batch_free  # computed once for the batch's samples, which share it
        for index, values in enumerate(self.cache):
            ran = session.run(names, {t.name: values[t.name] for t in before}) if session else []
            got = detached(dict(zip(names, ran, strict=True)))
            entry = {t.name: values[t.name] if t.name in kept else got[t.name] for t in after}
            size += _nbytes(entry)
            if index and size > self.memory_bytes:
                del self.cache[index:], self.rows[index:]
                log.info("bias-correct: the values live before %s fill memory-mb=%d at %d samples: measuring it "
                         "and the layers after it on those", out.name, self.memory_bytes // 2**20, self.samples())
                break
            self.cache[index] = entry  # the values no later node reads are freed now, not after the last batch
            total, counted = linear.sums(entry) if linear else channel_sums(got, out.name, axis, reduced)
            rows = self.rows[index] if weight else 1
            sums, count = sums + total * rows, count + counted * rows
        self.cut = end
        return sums / max(count, 1), len(self.cache)

    def outputs(self) -> Iterator[dict[str, np.ndarray]]:
        """The model's outputs for each cached batch in turn, running the nodes from the last cut on (the last
        layer measured, with its corrected bias, and what follows it); the Pieces must have been made with
        outputs=True. Outputs computed from constants alone are left out."""
        before, pulled = self._live(self.cut)
        kept = {t.name for t in before}
        nodes = pulled + self._nodes(self.cut, len(self.order) - 1)
        made = {t.name for n in nodes for t in n.outputs}
        names = [t.name for t in self.model.graph.outputs if t.name in kept or t.name in made]
        computed = [t for t in self.model.graph.outputs if t.name in made and t.name not in kept]
        session = self._session(nodes, before, computed, None, 0)[0] if computed else None
        for values in self.cache:
            ran = session.run([t.name for t in computed], {t.name: values[t.name] for t in before}) if session else []
            got = dict(zip([t.name for t in computed], ran, strict=True))
            yield {name: got[name] if name in got else values[name] for name in names}

    def _live(self, at: int) -> tuple[list[gs.Tensor], list[gs.Node]]:
        """The computed values made before position `at` (or model inputs) that a node at `at` or later reads, and
        the activation DequantizeLinears among their producers. For those the integers are kept (a quarter of the
        memory) and the piece dequantizes them again, as the model does: fed float values, ONNX Runtime made a
        Gemm whose weight alone came through a DequantizeLinear a MatMulNBits, which quantizes its float input
        its own way (the test MLP's fc1 output was off by up to 0.016 against the whole model's)."""
        read_later = [t for t in self.model.graph.inputs if self.last_read.get(t.name, -1) >= at]
        live: dict[str, gs.Tensor] = {t.name: t for t in read_later}
        pulled = []
        for node in self.order[:at]:
            if self._is_static(node):
                continue
            for tensor in (t for t in node.outputs if self.last_read.get(t.name, -1) >= at):
                if node.op == "DequantizeLinear":
                    pulled.append(node)
                    tensor = node.inputs[0]
                live[tensor.name] = tensor
        return list(live.values()), pulled

    def _nodes(self, start: int, end: int) -> list[gs.Node]:
        """The nodes at start..end that read data, and every constant-only node they read from."""
        nodes = [n for n in self.order[start:end + 1] if not self._is_static(n)]
        seen, stack = {id(n) for n in nodes}, list(nodes)
        while stack:
            for tensor in outer_uses(stack.pop()):
                producer = tensor.inputs[0] if tensor.inputs else None
                if producer is not None and id(producer) not in seen and self._is_static(producer):
                    seen.add(id(producer))
                    nodes.append(producer)
                    stack.append(producer)
        return nodes

    def _is_static(self, node: gs.Node) -> bool:
        """Computed from constants alone (also nodes added after the cut, as _shift_trial_bias does)."""
        key = id(node)
        if key not in self.static:
            self.static[key] = all(isinstance(t, gs.Constant) or (t.inputs and self._is_static(t.inputs[0]))
                                   for t in outer_uses(node))
        return self.static[key]

    def _session(self, nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor],
                 out: gs.Tensor | None, axis: int):
        """A session of the piece, with `out` (if any) averaged in the graph where channel_means would (so a conv
        output leaves ONNX Runtime as [N, C]); returns it and how `out` was reduced."""
        # A piece holds the DequantizeLinear of every value live at its cut, and ONNX Runtime ran those no output
        # reads: on bench/highres_bench.py's U-Net (64 samples at 512x512) every piece dequantized the skip
        # connections again, and the pieces took 24.8 s; 16.3 s without them.
        nodes = live_nodes(nodes, outputs)
        for tensor in inputs:  # typed from the values fed: their rank, no fixed size (batches vary in length)
            value = self.cache[0][tensor.name]
            tensor.dtype, tensor.shape = value.dtype, [f"{tensor.name}_{i}" for i in range(value.ndim)]
        graph = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=self.model.graph.opset,
                         import_domains=self.model.graph.import_domains, ir_version=self.model.graph.ir_version)
        piece = Model(graph, source=self.model.source, source_opset=self.model.source_opset)
        weights: dict[str, np.ndarray] = {}
        proto, reduced = pooled_proto(piece, {out.name: axis} if out is not None else {}, weights)
        types = infer_types(proto)
        for value in proto.graph.output:
            if not value.type.tensor_type.elem_type:
                value.type.tensor_type.elem_type = types.get(value.name, (onnx.TensorProto.FLOAT,))[0] \
                    or onnx.TensorProto.FLOAT
        session = calibration_session(proto, [], may_renumber=False, weights=weights)
        return session, reduced.get(out.name) if out is not None else None


class LinearMean:
    """The per-channel output mean of a Conv or Gemm, from its input alone: the layer is linear, so the mean of
    its output over the positions it computes is its weights applied to the mean input under each kernel tap
    (zero where a tap falls in the padding), plus its bias. Integer inputs are summed as integers and
    dequantized once. It reads the layer's constants as the quantized model has them (weights and bias through
    their DequantizeLinear), and takes only layers whose input is dequantized from integers. Measuring the convs
    this way took the pieces of bench/highres_bench.py's U-Net at 512x512 (64 samples) from 23.6 to 15.8 s, and
    bias-correct on the bench's ResNet-50 from 5.1 to 3.9 s; the means differ from ONNX Runtime's float32 ones
    in the last digits. `of` returns None for what it does not cover (auto_pad SAME, Gemm with alpha, beta or
    transA, non-constant weights, a float input or one dequantized per axis): those layers run."""

    CHUNK = 16  # input channels summed at a time: the float64 sums of a 512x512 map are 2 MB per channel

    def __init__(self, node: gs.Node, source: str, scale: float, zero_point: float, weight: np.ndarray,
                 bias: np.ndarray):
        self.node, self.source, self.scale, self.zero_point = node, source, scale, zero_point
        self.weight, self.bias = weight, bias

    @classmethod
    def of(cls, node: gs.Node, pulled: Mapping[str, gs.Node]) -> LinearMean | None:
        if node.op == "Conv" and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        if node.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0
                                  or node.attrs.get("transA", 0)):
            return None
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2:
            return None
        weight = constant_value(node.inputs[1])
        bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else np.zeros(1)
        if weight is None or bias is None:
            return None
        if node.op == "Gemm" and node.attrs.get("transB", 0):  # x @ weight below: [K, N]
            weight = weight.T
        dq = pulled.get(node.inputs[0].name)
        if dq is None:  # a float input: ONNX Runtime may quantize it its own way (MatMulNBits), so it runs
            return None
        scale, zero_point = constant_value(dq.inputs[1]), constant_value(dq.inputs[2]) if len(dq.inputs) > 2 else 0
        if scale is None or zero_point is None or np.size(scale) != 1 or np.size(zero_point) != 1:
            return None
        return cls(node, dq.inputs[0].name, float(scale), float(np.asarray(zero_point).reshape(())), weight,
                   bias.reshape(-1))

    def sums(self, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """(per-channel sum over the batch's samples of their mean output, samples), as channel_sums gives."""
        x = values[self.source]
        if x.ndim < 2 or (self.node.op == "Gemm" and x.ndim != 2):
            raise InputError(f"bias-correct: {self.node.name}'s input has shape {x.shape}")
        rows = len(x)
        if self.node.op == "Gemm":
            return self._summed(x) @ self.weight + rows * self.bias, rows
        taps, positions = self._taps(x)
        groups = self.node.attrs.get("group", 1)
        c_out = self.weight.shape[0]
        w = self.weight.reshape(groups, c_out // groups, -1).astype(np.float64)
        per_channel = np.einsum("gok,gk->go", w, taps.reshape(groups, -1)).reshape(c_out)
        return per_channel / positions + rows * self.bias, rows

    def _summed(self, x: np.ndarray) -> np.ndarray:
        """The batch's sum over its first axis, dequantized."""
        return self.scale * (x.sum(axis=0, dtype=np.int64) - len(x) * self.zero_point)

    def _taps(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """[C_in, *kernel] sums of the batch's dequantized input under each kernel tap over the output positions,
        and the number of output positions. The integers are summed over the batch, then each spatial axis is
        cut into the bands the taps' ranges start and end at, summed once (window_sums): a pass over the data,
        where a window sum per tap of the padded map was one pass per tap (k^2 for a k x k kernel). Padding adds
        nothing to the float sums: a tap's integer sum is dequantized with the count of its positions inside."""
        spatial, kernel = x.ndim - 2, self.weight.shape[2:]
        attrs = self.node.attrs
        strides, dilations = attrs.get("strides", [1] * spatial), attrs.get("dilations", [1] * spatial)
        pads = attrs.get("pads", [0] * 2 * spatial)
        padded = [x.shape[2 + i] + pads[i] + pads[i + spatial] for i in range(spatial)]
        outs = [(padded[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(spatial)]
        ranges = [tap_ranges(x.shape[2 + i], kernel[i], pads[i], dilations[i], strides[i], outs[i])
                  for i in range(spatial)]
        inside = np.ones(())
        for axis_ranges in ranges:  # [*kernel] positions of each tap inside the input, per sample
            inside = np.multiply.outer(inside, [end - first for _, first, end in axis_ranges])
        taps = np.empty((x.shape[1], *kernel))
        for start in range(0, x.shape[1], self.CHUNK):
            summed = _batch_sum(x[:, start:start + self.CHUNK])
            taps[start:start + self.CHUNK] = window_sums(summed, ranges, strides)
        return self.scale * (taps - len(x) * self.zero_point * inside), math.prod(outs)


def _batch_sum(x: np.ndarray) -> np.ndarray:
    """The integers' sum over the first axis, exact: 16 bits hold 256 samples of 8 bits, and summing into them
    took a sixth of the time of int64 sums (a [8, 32, 512, 512] uint8 batch: 0.03 against 0.18 s)."""
    if len(x) <= 256 and x.dtype in (np.uint8, np.int8):
        return np.add.reduce(x, axis=0, dtype=np.uint16 if x.dtype == np.uint8 else np.int16)
    return x.sum(axis=0, dtype=np.int64)


def tap_ranges(size: int, kernel: int, pad: int, dilation: int, stride: int,
               outs: int) -> list[tuple[int, int, int]]:
    """Per kernel tap along one axis of `size` values: (residue, first, end), the input positions the tap reads
    over the `outs` output positions being residue + stride * i for i in [first, end) (first == end: it reads
    only padding)."""
    found = []
    for offset in range(kernel):
        at = offset * dilation - pad  # the input position the tap reads for output position 0
        low = 0 if at >= 0 else -at // stride + (-at % stride > 0)
        high = 0 if at > size - 1 else min(outs, (size - 1 - at) // stride + 1)
        residue = at % stride
        base = (at - residue) // stride
        found.append((residue, base + low, base + max(low, high)))
    return found


def window_sums(x: np.ndarray, ranges: list[list[tuple[int, int, int]]], strides: list[int]) -> np.ndarray:
    """[C, *kernel] sums of x ([C, *spatial]) over each tap's positions (tap_ranges, per spatial axis), an axis at
    a time; float64."""
    for axis, (axis_ranges, stride) in enumerate(zip(ranges, strides, strict=True), start=1):
        x = _axis_sums(x, axis, axis_ranges, stride)
    return x


def _axis_sums(x: np.ndarray, axis: int, ranges: list[tuple[int, int, int]], stride: int) -> np.ndarray:
    """x with `axis` replaced by one entry per range: the sum over the range's positions along it."""
    out = np.zeros(x.shape[:axis] + (len(ranges),) + x.shape[axis + 1:])
    for residue in sorted({r for r, first, end in ranges if end > first}):
        phase = x[(slice(None),) * axis + (slice(residue, None, stride),)]
        mine = [(k, first, end) for k, (r, first, end) in enumerate(ranges) if r == residue and end > first]
        points = sorted({p for _, first, end in mine for p in (first, end) if p < phase.shape[axis]})
        bands = np.add.reduceat(phase, points, axis=axis, dtype=np.float64 if x.dtype.kind == "f" else np.int64)
        prefix = np.concatenate([np.zeros_like(bands.take([0], axis)), np.cumsum(bands, axis=axis)], axis=axis)
        at = {p: i for i, p in enumerate(points)} | {phase.shape[axis]: len(points)}
        for k, first, end in mine:
            out[(slice(None),) * axis + (k,)] = prefix.take(at[end], axis) - prefix.take(at[first], axis)
    return out


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's values, or a DequantizeLinear of constants dequantized (float64); None for anything else."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values, np.float64)
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in dq.inputs):
        return None
    q, scale = np.asarray(dq.inputs[0].values, np.float64), np.asarray(dq.inputs[1].values, np.float64)
    zero = np.asarray(dq.inputs[2].values, np.float64) if len(dq.inputs) > 2 else np.zeros_like(scale)
    if scale.size > 1:  # per axis
        shape = [1] * q.ndim
        shape[dq.attrs.get("axis", 1) % q.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _nbytes(values: Mapping[str, np.ndarray]) -> int:
    return sum(value.nbytes for value in values.values())


def biased_output(node: gs.Node, holder: gs.Node) -> gs.Tensor:
    """A layer's biased output in the float model: the Conv's or Gemm's, or its bias Add's."""
    return holder.outputs[0] if holder is not node else node.outputs[0]


def _in_trial(nodes: Mapping[str, gs.Node], node: gs.Node, holder: gs.Node,
              index: int) -> tuple[gs.Tensor, int, tuple[gs.Node, int]] | None:
    """The layer's output in the quantized copy, its channel axis, and where its bias is there (None: the copy has
    no quantized layer of that name). insert-qdq turns an ort-cpu MatMul + bias Add into a Gemm of the MatMul's name
    over [rows, N] (bias_gemm.py): the mean over rows is the mean over tokens."""
    quantized = nodes.get(node.name)
    if quantized is None or not _weight_quantized(quantized):
        return None
    if quantized.op in ("Conv", "Gemm"):
        return quantized.outputs[0], channel_axis(quantized), (quantized, 2)
    add = nodes.get(holder.name)
    return None if add is None else (add.outputs[0], -1, (add, index))


def _shift_trial_bias(trial: Model, holder: gs.Node, index: int, shift: np.ndarray,
                      original: np.ndarray) -> np.ndarray:
    """Add `shift` to the bias at holder.inputs[index] of the quantized copy, as new tensors (another layer may
    share the old ones); return the change that gives the float model's bias (`original`) the copy's new value.
    An int32 bias behind a DequantizeLinear (ONNX Runtime's integer kernels take it so) moves by whole steps of its
    scale, and the float bias becomes exactly those steps: insert-qdq rounds it back to the same integers, so the
    model it writes is the one measured (rounding the corrected float bias instead was one step off here and there,
    which the next layers' corrections had not seen). A float bias moves by `shift`."""
    bias = holder.inputs[index]
    if isinstance(bias, gs.Constant):
        values = np.asarray(bias.values)
        if values.size == shift.size:
            moved = values + shift.reshape(values.shape)
        else:  # one value for every channel
            moved = np.broadcast_to(values.reshape(-1), shift.shape) + shift
        holder.inputs[index] = gs.Constant(trial.unique_name(f"{bias.name}_shifted"), moved.astype(values.dtype))
        return shift
    dq = bias.inputs[0] if bias.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant) \
            or np.asarray(dq.inputs[0].values).dtype != np.int32:
        return np.zeros_like(shift)  # not a bias insert-qdq writes: left as it is, in the copy and the model
    q = np.asarray(dq.inputs[0].values)
    steps = np.round(shift / np.asarray(dq.inputs[1].values, np.float64)).reshape(q.shape)
    moved = np.clip(q.astype(np.int64) + steps.astype(np.int64), -(2**31), 2**31 - 1).astype(np.int32)
    values = gs.Constant(trial.unique_name(f"{dq.inputs[0].name}_shifted"), moved)
    output = gs.Variable(trial.unique_name(f"{bias.name}_shifted"), dtype=bias.dtype, shape=bias.shape)
    trial.graph.nodes.append(gs.Node("DequantizeLinear", trial.unique_name(f"{dq.name}_shifted"),
                                     attrs=dict(dq.attrs), inputs=[values, *dq.inputs[1:]], outputs=[output]))
    holder.inputs[index] = output
    exact = moved.astype(np.float32) * np.asarray(dq.inputs[1].values, np.float32)
    return exact.astype(np.float64).reshape(-1) - original
