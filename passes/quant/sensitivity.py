"""Per-layer quantization sensitivity and automatic mixed precision.

Sensitivity of a layer = the output SQNR, 10·log10(Σ y² / Σ (y − ŷ)²) over the evaluation samples (the
first EVAL_SAMPLES of the calibration data) of the worst model output, when only that layer (its activation
inputs and weights) is quantized. Lower means more sensitive. Mixed precision keeps the most sensitive
layers in float, ranked on the first SWEEP_SAMPLES: `keep-fp=K` keeps the K lowest; `min-sqnr=S` keeps the
fewest most-sensitive layers for which the fully quantized model's SQNR on all evaluation samples reaches S,
found by bisection on that count (SQNR grows, up to noise, as layers return to float).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np

from irtool.calibration.data import first_batches
from irtool.calibration.tap import detached, tap
from irtool.ir.model import Model
from irtool.passmanager import PassContext
from irtool.progress import bar

log = logging.getLogger(__name__)
# Every SQNR here is measured on the first batches of the calibration data holding EVAL_SAMPLES samples; the
# per-layer sweep of mixed precision ranks the layers on the first SWEEP_SAMPLES of them. The sweep runs one
# trial per layer and ONNX Runtime's runs were 87% of it (the bench's MobileNetV2: 61 trials of 128 samples,
# 60 s); the ranking needs the order of the layers, and the bisection that decides how many stay float still
# measures on all EVAL_SAMPLES. 16 samples ranked the bench's random-weight ResNet-50 and MobileNetV2 like 128
# did (rank correlation 0.999 and 1.0, the same ten most sensitive layers) and kept the same layers (20 and 19)
# at the same SQNR; `min-sqnr=20` on that ResNet-50 took 67.5 s instead of 92.4 s with 32.
EVAL_SAMPLES, SWEEP_SAMPLES = 128, 16


def _outputs(model: Model, ctx: PassContext) -> list[dict[str, np.ndarray]]:
    names = [t.name for t in model.graph.outputs]
    return [detached(values) for values in tap(model, names, ctx.calibration_data())]


def with_eval_batches(ctx: PassContext, samples: int = EVAL_SAMPLES) -> PassContext:
    """A context whose calibration data is the first batches holding `samples` samples (or all of them), read
    once (copied, in case the source reuses its arrays) and replayed to every trial: a sensitivity sweep runs
    one trial per layer, and re-reading the data each time cost a quarter of a trial on the bench's MobileNetV2
    (synthetic images)."""
    if ctx.calibration_data is None:
        return ctx
    batches = [{name: np.array(value) for name, value in batch.items()}
               for batch in first_batches(ctx.calibration_data(), samples)]
    return dataclasses.replace(ctx, calibration_data=lambda: iter(batches))


def float_outputs(model: Model, ctx: PassContext) -> list[dict[str, np.ndarray]]:
    """The float model's outputs, the reference of every SQNR here. After `bias-correct` the model carries
    corrected biases, and after `gptq` rounded weights, which only quantized layers should have: the float ones
    are restored on a copy first."""
    from irtool.passes.quant.insert_qdq import (
        BIAS_CORRECTION_KEY,
        WEIGHT_ROUNDING_KEY,
        restore_uncorrected_biases,
        restore_unrounded_weights,
    )

    if BIAS_CORRECTION_KEY not in model.metadata and WEIGHT_ROUNDING_KEY not in model.metadata:
        return _outputs(model, ctx)
    original = model.copy()
    restore_uncorrected_biases(original, set())
    restore_unrounded_weights(original, set())
    return _outputs(original, ctx)


def output_sqnr(reference: list[dict[str, np.ndarray]], test: list[dict[str, np.ndarray]]) -> float:
    """The worst float output's SQNR (all outputs when none is float): a class index or a TopK index output is
    not a signal, and a flipped index counted its squared distance in classes into the noise. Per output, not
    pooled: a detector's box coordinates (hundreds of pixels) held the pooled signal, and its class scores
    (0-1) could lose every digit without moving it. An output that is zero in float everywhere is not a signal
    either (no ratio to take), unless every output is."""
    return streamed_sqnr(zip(reference, test, strict=True))


def streamed_sqnr(pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> float:
    """output_sqnr over (reference, test) pairs of batches, each freed once counted."""
    names: list[str] | None = None
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for ref, out in pairs:
        if names is None:
            names = [n for n, v in ref.items() if v.dtype.kind == "f"] or list(ref)
        for name in names:
            value = ref[name].astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(value ** 2))
            noise[name] = noise.get(name, 0.0) + float(np.sum((value - out[name]) ** 2))
    measured = [name for name in signal if signal[name]] or list(signal)
    return min((_sqnr(signal[name], noise[name]) for name in measured), default=math.inf)


def _sqnr(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise) if signal else -math.inf


def quantized_sqnr(model: Model, ranges, placement, selection, reference, ctx: PassContext) -> float:
    from irtool.passes.quant.insert_qdq import apply_plan, build_plan

    trial = model.copy()
    plan = build_plan(trial, placement, selection)
    apply_plan(trial, plan, ranges, placement)
    return output_sqnr(reference, _outputs(trial, ctx))


def layer_sensitivity(model: Model, ranges, placement, base, ctx: PassContext,
                      reference: list[dict[str, np.ndarray]] | None = None) -> list[tuple[str, float]]:
    """(layer, SQNR with only that layer quantized), most sensitive first. Its callers pass a context from
    with_eval_batches, so the sweep reads the data once, and the float outputs they already have."""
    reference = float_outputs(model, ctx) if reference is None else reference
    layers = [n.name for n in base.enabled(model)]
    results = []
    for index, name in enumerate(bar(layers, ctx.progress, "quant-sensitivity", "layer")):
        ctx.logger.info("quant-sensitivity: layer %d/%d %s", index + 1, len(layers), name)
        only = dataclasses.replace(base, only=frozenset([name]))
        results.append((name, quantized_sqnr(model, ranges, placement, only, reference, ctx)))
    return sorted(results, key=lambda item: (item[1], item[0]))


def keep_in_float(model: Model, ranges, placement, base, ctx: PassContext, *, min_sqnr: float | None,
                  keep_fp: int) -> set[str]:
    from irtool.errors import InputError

    if ctx.calibration_data is None:
        raise InputError("mixed precision (min-sqnr / keep-fp) needs calibration data")
    ctx = with_eval_batches(ctx)
    reference = float_outputs(model, ctx)
    if min_sqnr is not None and not keep_fp:
        # The common case costs one evaluation: the fully quantized model already meets the target.
        full = quantized_sqnr(model, ranges, placement, base, reference, ctx)
        if full >= min_sqnr:
            log.info("mixed precision: all layers quantized reach %.1f dB >= %.1f dB", full, min_sqnr)
            return set()
    sweep = with_eval_batches(ctx, SWEEP_SAMPLES)
    ranked = [name for name, _ in layer_sensitivity(model, ranges, placement, base, sweep,
                                                    reference[:_batch_count(sweep)])]
    if min_sqnr is None:
        return set(ranked[:keep_fp])

    def sqnr_keeping(count: int) -> float:
        keep = frozenset(ranked[:count])
        return quantized_sqnr(model, ranges, placement, dataclasses.replace(base, keep_fp=keep), reference, ctx)

    low, high = max(keep_fp, 0), len(ranked)
    if sqnr_keeping(low) >= min_sqnr:
        return set(ranked[:low])
    while high - low > 1:
        mid = (low + high) // 2
        if sqnr_keeping(mid) >= min_sqnr:
            high = mid
        else:
            low = mid
    log.info("mixed precision: %d of %d layers kept in float to reach %.1f dB", high, len(ranked), min_sqnr)
    return set(ranked[:high])


def _batch_count(ctx: PassContext) -> int:
    return sum(1 for _ in ctx.calibration_data())


# ----------------------------------------------------------------------------------- the report
class SensitivityReport:
    """Ranked per-layer sensitivity plus the fully quantized model's SQNR, as JSON, text or a chart."""

    def __init__(self, rows: list[tuple[str, str, float]], full_sqnr: float, profile: str, method: str):
        self.rows, self.full_sqnr, self.profile, self.method = rows, full_sqnr, profile, method

    def to_dict(self) -> dict:
        return {"profile": self.profile, "method": self.method, "full_model_sqnr_db": _finite(self.full_sqnr),
                "layers": [{"rank": i + 1, "layer": name, "op": op, "sqnr_db": _finite(sqnr)}
                           for i, (name, op, sqnr) in enumerate(self.rows)]}

    def to_text(self) -> str:
        lines = [f"quantization sensitivity ({self.profile}, {self.method}); all layers quantized: "
                 f"{self.full_sqnr:.2f} dB output SQNR", f"{'rank':>4}  {'SQNR dB':>8}  {'op':<14} layer"]
        lines += [f"{i + 1:>4}  {sqnr:>8.2f}  {op:<14} {name}" for i, (name, op, sqnr) in enumerate(self.rows)]
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> bool:
        """Write a bar chart PNG; False when matplotlib is not installed (it is optional)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed: no chart written (pip install matplotlib)")
            return False
        names = [name for name, _, _ in self.rows]
        values = [min(sqnr, 100.0) for _, _, sqnr in self.rows]
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(names))))
        ax.barh(names[::-1], values[::-1], color="tab:blue")
        ax.axvline(self.full_sqnr, color="tab:red", linestyle="--", label="all layers INT8")
        ax.set_xlabel("output SQNR with only this layer in INT8 (dB, lower = more sensitive)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def sensitivity_report(model: Model, ranges, placement, ctx: PassContext) -> SensitivityReport:
    from irtool.passes.deconv import rewritten
    from irtool.passes.quant.placement import Selection

    convtransposes = frozenset(rewritten(model))
    base = Selection(convtransposes=convtransposes)
    ctx = with_eval_batches(ctx)
    ops = {n.name: "ConvTranspose" if n.name in convtransposes else n.op for n in model.graph.nodes}
    reference = float_outputs(model, ctx)
    ranked = layer_sensitivity(model, ranges, placement, base, ctx, reference)
    full = quantized_sqnr(model, ranges, placement, base, reference, ctx)
    return SensitivityReport([(name, ops[name], sqnr) for name, sqnr in ranked], full,
                             placement.profile.value, placement.activations.value)


def report_for_path(path: str, *, profile: str, method: str, seed: int, input_shapes: dict,
                    calibration_data, calib_samples=None, calib_batch_size=None, calib_preprocess=None,
                    calib_cache=None, progress: bool = False) -> SensitivityReport:
    """The CLI's entry: calibrate a private copy of the model, then rank its layers."""
    from irtool.calibration.data import as_calibration_data
    from irtool.ir.gelu import fuse_gelu
    from irtool.passes.fp16 import Float32
    from irtool.passes.quant.calibrate import Calibrate, Method, stored_ranges
    from irtool.passes.quant.insert_qdq import ActivationType, Placement, Profile

    model = Model.load(path)
    data = as_calibration_data(calibration_data, model, samples=calib_samples, seed=seed,
                               batch_size=calib_batch_size, preprocess=calib_preprocess, input_shapes=input_shapes)
    ctx = PassContext(seed=seed, input_shapes=input_shapes, calibration_data=data, calib_cache=calib_cache,
                      progress=progress)
    Float32()(model, ctx)  # as the quant pipelines: INT8 placement takes float32 (every layer read inf dB before)
    Calibrate(method=Method(method), profile=Profile(profile))(model, ctx)
    if Profile(profile) is Profile.ORT_CPU:
        fuse_gelu(model)  # as insert-qdq does before it plans, so that the trials quantize what it would
    placement = Placement(Profile(profile), ActivationType.S8 if profile == "trt" else ActivationType.U8, True,
                          reduce_range=True)
    return sensitivity_report(model, stored_ranges(model), placement, ctx)
