"""Pass `calibrate`: activation ranges from calibration data, stored in the model for `insert-qdq`.

Observes every tensor the Q/DQ profile may quantize (`profile=trt` or `ort-cpu`; by default any profile,
passes/quant/placement.py) in one streaming pass of ONNX Runtime (irtool.calibration.engine) and turns
the statistics into a [low, high] range per tensor: minmax takes the observed extremes; percentile,
entropy and mse compute a threshold T on |x| from the histogram (irtool.calibration.observers) and clip
the extremes to [-T, T]. Graph inputs, probabilities and logits always keep their min/max range. A tensor
that only HardSwish or HardSigmoid read (MobileNetV3's conv outputs) has its range cut to where they are not
constant: below -3 HardSwish is 0, so values there need no steps of their own (exact; `_within_readers`); a
SiLU's input likewise, where SiLU is within half an output step of 0.
The ranges travel to `insert-qdq` through the IR, as JSON in the model's metadata under `irtool.calibration`,
so the two passes can also run in separate invocations. Naming the profile observes fewer tensors (the ViT of
bench/quant_bench.py: 98 for trt against 268) and, on ResNet-50, leaves the convs feeding residual Adds unobserved,
so ONNX Runtime keeps its Conv+Add fusion in the calibration graph; insert-qdq then refuses another profile.
A value made from another by a pure rearrangement (placement.PERMUTATION_OPS: Transpose, Reshape, ...) is not
observed itself: it holds the same values, so it gets that value's statistics (`permutation_sources`).
The ConvTransposes that convtranspose-to-conv rewrote run restored in the float pass where their output is not
cropped (deconv.float_copy; the U-Net of bench/highres_bench.py: 14.5-16.9 s against 17.4-19.1 s on the phase
Convs); a phase Conv's output has the ConvTranspose output's statistics (the same values, interleaved). minmax only
(`_float_model`): a histogram's subsample depends on the layout.
When the next pass asks (Pass.float_request: bias-correct, either mode), the same pass also takes the float layer
means and outputs it would run the float model for (irtool.calibration.reference; stat `recorded`, the values
recorded).
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass

from irtool.calibration.engine import TensorStats, Timings, collect
from irtool.calibration.observers import DEFAULT_BINS
from irtool.calibration.reference import FloatReference, Recorder
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.rewrite import SHAPE_READERS
from irtool.passes.deconv import float_copy, rewritten
from irtool.passes.quant.derived import derived_tensors, silu_input, silu_tail
from irtool.passes.quant.hard_activations import sensitive_interval
from irtool.passes.quant.placement import (
    PERMUTATION_OPS,
    SELECTION_OPS,
    SHARED_SCALE_OPS,
    Profile,
    candidate_tensors,
    moved_from,
    refuse_quantized,
)
from irtool.passmanager import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
METADATA_KEY = "irtool.calibration"


class Method(enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


def tensor_range(stats: TensorStats, method: Method, percentile: float) -> tuple[float, float]:
    low, high = stats.minmax.low, stats.minmax.high
    if method is Method.MINMAX or stats.histogram is None:
        return low, high
    if method is Method.PERCENTILE:
        threshold = stats.histogram.percentile(percentile)
    elif method is Method.ENTROPY:
        threshold = stats.histogram.entropy(unsigned=low >= 0.0)
    else:
        threshold = stats.histogram.mse()
    return max(low, -threshold), min(high, threshold)


def _recorder(model: Model, ctx: PassContext) -> Recorder | None:
    """A Recorder of what the next pass asks for (reference.py), or None."""
    request = ctx.upcoming[0].float_request(model) if ctx.upcoming else None
    if request is None or not request.axes:
        return None
    return Recorder(request, [t.name for t in model.graph.outputs])


def _float_model(model: Model, recorder: Recorder | None, histograms: bool) -> tuple[Model, dict[str, str]]:
    """The model the float pass runs, and {value of `model`: its name there}: the ConvTransposes that
    convtranspose-to-conv rewrote are restored where that changes no value's numbers (deconv.float_copy; the
    stats of a phase Conv's output are those of the ConvTranspose's, the same values interleaved), unless the
    recorder asks for a value the restored copy lacks. Given phase outputs to record, the recorder takes their
    channel means from the ConvTranspose outputs (tap.pool_values). For minmax only, whose reductions are exact: a
    histogram's subsample depends on the layout, and the phase Conv's output holds every phase in its channels.
    (Found when the subsample's even strides still fell on one phase of an upsampled map: the pose net of
    tests/passes/test_convtranspose_to_conv.py had percentile ranges 6.8% apart; observers.spatial_stride and
    row_indices now spread over the phases, and histogram methods could be restored too once measured.)"""
    if histograms:
        return model, {}
    copy, renamed, phases = float_copy(model)
    if copy is model:
        return model, {}
    if recorder is not None:
        present, asked = copy.graph.tensors(), recorder.request.axes
        if any(name not in present and not (name in phases and asked[name] == 1) for name in asked):
            return model, {}
        recorder.phases = {name: phases[name] for name in asked if name in phases}
    return copy, renamed


def permutation_sources(model: Model, names: list[str]) -> dict[str, str]:
    """{name: the tensor whose statistics it shares}: up through PERMUTATION_OPS to the first value that is
    not made by one (itself when its producer is not one), and on through SELECTION_OPS to a value that is
    observed anyway. The ViT of bench/quant_bench.py observes 232 tensors instead of 280 (its attention
    transposes and head reshapes); YOLO's C2f chunks (Split) are not observed apart from the conv output."""
    tensors = model.graph.tensors()
    candidates = set(names)
    sources = {}
    for name in names:
        tensor = source = tensors[name]
        selected = False  # passed a SELECTION_OPS node: from here on only an observed value may be the source
        while (moved := moved_from(tensor, PERMUTATION_OPS | SELECTION_OPS)) is not None:
            selected = selected or tensor.inputs[0].op in SELECTION_OPS
            tensor = moved
            if not selected or moved.name in candidates:
                source = moved
        sources[name] = source.name
    return sources


class Calibrate(Pass):
    """Measure activation ranges on calibration data (minmax, percentile, entropy, mse)."""

    name = "calibrate"

    @dataclass(frozen=True)
    class Options:
        method: Method = Method.MINMAX
        percentile: float = 99.99
        bins: int = DEFAULT_BINS
        profile: Profile | None = None  # None: every tensor any profile quantizes

        def __post_init__(self):
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
            if self.bins < 256 or self.bins % 2:
                raise ValueError(f"bins must be an even number >= 256, got {self.bins}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise InputError("calibrate needs calibration data (--calib-data PATH, or --calib-data random "
                             "to calibrate on random inputs)")
        refuse_quantized(model, "calibrate")
        names = candidate_tensors(model, self.options.profile)
        sources = permutation_sources(model, names)
        derived = derived_tensors(model, names)
        timings = Timings()
        observe = sorted(set(sources.values()) - set(derived))
        unclipped = set(unclipped_tensors(model, observe))
        recorder = _recorder(model, ctx)
        target, renamed = _float_model(model, recorder, histograms=self.options.method is not Method.MINMAX)
        found = collect(target, sorted({renamed.get(n, n) for n in observe}), ctx.calibration_data,
                        histograms=self.options.method is not Method.MINMAX, bins=self.options.bins,
                        cache_dir=ctx.calib_cache, progress=ctx.progress, timings=timings,
                        exact={renamed.get(n, n) for n in unclipped}, recorder=recorder)
        observed = {name: found[renamed.get(name, name)] for name in observe}
        started = time.perf_counter()
        ranges = self._ranges(model, observed, sources, derived, unclipped)
        timings.search = time.perf_counter() - started
        profile = None if self.options.profile is None else self.options.profile.value  # None: any profile
        model.metadata[METADATA_KEY] = json.dumps({"method": self.options.method.value, "ranges": ranges,
                                                   "profile": profile}, sort_keys=True)
        stats = {"tensors": len(ranges), "observed": len(observed), "derived": len(derived),
                 "method": self.options.method.value,
                 "profile": profile, "seconds": timings.as_dict()}
        recorded = recorder.result() if recorder is not None else None
        if rewritten(model):  # ConvTransposes that convtranspose-to-conv rewrote, run restored in the float pass
            stats["convtransposes_restored"] = len(rewritten(model)) - len(rewritten(target))
        if recorded is not None:
            ctx.provide(FloatReference, recorded)
            stats["recorded"] = len(recorded.sums.keys() | recorded.totals.keys())
        return PassResult(modified=True, preserved="*", stats=stats)

    def _ranges(self, model: Model, observed: dict[str, TensorStats], sources: dict[str, str], derived: dict,
                unclipped: set[str]) -> dict[str, list[float]]:
        """A range per tensor, searched once per observed tensor; derived ones mapped from their origin's. Raw model
        inputs are never clipped (the network never saw them saturated), nor are `unclipped_tensors`."""
        unclipped = unclipped | {t.name for t in model.graph.inputs}
        searched: dict[str, list[float]] = {}

        def source_range(source: str) -> list[float]:
            if source not in searched:
                if source in derived:
                    origin, mapped = derived[source]
                    values = mapped(*source_range(sources[origin]))
                else:
                    method = Method.MINMAX if source in unclipped else self.options.method
                    values = tensor_range(observed[source], method, self.options.percentile)
                searched[source] = [float(v) for v in values]
            return searched[source]

        tensors, outputs = model.graph.tensors(), {t.name for t in model.graph.outputs}
        ranges = {name: source_range(source) for name, source in sources.items()}
        return {name: bounds if name in outputs else _within_readers(tensors[name], bounds)
                for name, bounds in ranges.items()}


def _within_readers(tensor, bounds: list[float]) -> list[float]:
    """`bounds` cut to where the tensor's readers tell values apart. All HardSwish or HardSigmoid: HardSwish is 0
    below -3 and HardSigmoid constant outside [-3, 3], so a range past that only coarsens the steps, and cutting
    it is exact (MobileNetV3's expansion convs reach -10 to -28 before their HardSwish; MobileNetV3-like digits
    nets, 3 seeds, minmax: logit SQNR +0.4-0.8 dB). A SiLU's input (its Sigmoid and Mul the only readers) is cut
    below -T, where SiLU is within half an output step of 0 (derived.silu_tail; T ~ 6 for outputs up to 10):
    EfficientNet-like digits nets, 3 seeds, minmax +0.4-1.3 dB."""
    readers = [node for node in tensor.outputs if node.op not in SHAPE_READERS]
    if readers and silu_input(tensor):
        return [max(bounds[0], -silu_tail(bounds[1])), bounds[1]] if bounds[1] > 0 else bounds
    intervals = [sensitive_interval(node) for node in readers]
    if not intervals or None in intervals:
        return bounds
    low = max(bounds[0], min(i[0] for i in intervals))
    high = min(bounds[1], max(i[1] for i in intervals))
    return [min(low, 0.0), max(high, 0.0)]


def unclipped_tensors(model: Model, names: list[str]) -> list[str]:
    """The names that keep their observed range whatever the method: probabilities (Softmax outputs) and logits
    (read, through data movement, by Softmax or Sigmoid alone). Most of their values sit near the bottom, so a
    clipping threshold lands among the few large ones, which decide what they mean, and saturates exactly those; the
    tap reduces their extremes exactly, since a histogram's sample holds few of them. On the 640x640 YOLOv8-style
    test detector: `quant-trt` (entropy; the DFL probabilities clipped to 0.48, observed 0.76) had box coordinates
    7.1 px off on average, 104 px at most, now 0.53 and 9.4 px; `quant{method=entropy}` (its head logits clipped
    too) 4.1 px and scores 0.058 off on average, now 2.8 px and 0.0014 (minmax: 0.47 px). Giving probabilities
    [0, 1] instead cost the bench's ViT 5 dB (attention maps peaking near 0.3)."""
    tensors = model.graph.tensors()
    return [name for name in names if [p.op for p in tensors[name].inputs] == ["Softmax"]
            or _read_as_logits(tensors[name])]


def _read_as_logits(tensor) -> bool:
    """Read by Softmax or Sigmoid, through data movement and Concat, and by nothing else (not SiLU's Mul)."""
    pending, seen, found = list(tensor.outputs), set(), False
    while pending:
        node = pending.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op in ("Softmax", "Sigmoid"):
            found = True
        elif node.op in SHARED_SCALE_OPS or node.op == "Concat":
            pending.extend(reader for out in node.outputs for reader in out.outputs)
        elif node.op not in SHAPE_READERS:
            return False
    return found


def stored_profile(model: Model) -> Profile | None:
    """The profile the stored ranges were measured for (None: any profile, also for older models)."""
    text = model.metadata.get(METADATA_KEY)
    stored = None if text is None else json.loads(text).get("profile")
    return None if stored is None else Profile(stored)


def stored_ranges(model: Model) -> dict[str, tuple[float, float]] | None:
    text = model.metadata.get(METADATA_KEY)
    if text is None:
        return None
    return {k: (v[0], v[1]) for k, v in json.loads(text)["ranges"].items()}
