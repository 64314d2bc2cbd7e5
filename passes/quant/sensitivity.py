"""Per-layer quantization sensitivity and automatic mixed precision.

Sensitivity of a layer = the output SQNR, 10·log10(Σ y² / Σ (y − ŷ)²) over every model output and
calibration batch, when only that layer (its activation inputs and weights) is quantized. Lower
means more sensitive. Mixed precision keeps the most sensitive layers in float: `keep-fp=K` keeps the
K lowest; `min-sqnr=S` keeps the fewest most-sensitive layers for which the fully quantized model's
SQNR reaches S, found by bisection on that count (SQNR grows, up to noise, as layers return to float).
"""

from __future__ import annotations

import logging
import math
from itertools import islice

import numpy as np

from irtool.calibration.tap import tap
from irtool.ir.model import Model
from irtool.passmanager import PassContext

log = logging.getLogger(__name__)
MAX_EVAL_BATCHES = 8


def _outputs(model: Model, ctx: PassContext) -> list[dict[str, np.ndarray]]:
    names = [t.name for t in model.graph.outputs]
    return list(tap(model, names, islice(ctx.calibration_data(), MAX_EVAL_BATCHES)))


def output_sqnr(reference: list[dict[str, np.ndarray]], test: list[dict[str, np.ndarray]]) -> float:
    signal = noise = 0.0
    for ref, out in zip(reference, test, strict=True):
        for name, value in ref.items():
            value = value.astype(np.float64)
            signal += float(np.sum(value ** 2))
            noise += float(np.sum((value - out[name]) ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise) if signal else -math.inf


def quantized_sqnr(model: Model, ranges, placement, selection, reference, ctx: PassContext) -> float:
    from irtool.passes.quant.insert_qdq import ActivationType, Profile, apply_plan, build_plan

    trial = model.copy()
    plan = build_plan(trial, placement, selection)
    signed = placement.profile is Profile.TRT or placement.activations is ActivationType.S8
    apply_plan(trial, plan, ranges, signed)
    return output_sqnr(reference, _outputs(trial, ctx))


def layer_sensitivity(model: Model, ranges, placement, base, ctx: PassContext) -> list[tuple[str, float]]:
    """(layer, SQNR with only that layer quantized), most sensitive first."""
    from irtool.passes.quant.placement import Selection

    reference = _outputs(model, ctx)
    layers = [n.name for n in base.enabled(model)]
    results = []
    for index, name in enumerate(layers):
        ctx.logger.info("quant-sensitivity: layer %d/%d %s", index + 1, len(layers), name)
        only = Selection(base.exclude, base.exclude_ops, base.keep_first, base.keep_last, only=frozenset([name]))
        results.append((name, quantized_sqnr(model, ranges, placement, only, reference, ctx)))
    return sorted(results, key=lambda item: (item[1], item[0]))


def keep_in_float(model: Model, ranges, placement, base, ctx: PassContext, *, min_sqnr: float | None,
                  keep_fp: int) -> set[str]:
    from irtool.errors import InputError
    from irtool.passes.quant.placement import Selection

    if ctx.calibration_data is None:
        raise InputError("mixed precision (min-sqnr / keep-fp) needs calibration data")
    ranked = [name for name, _ in layer_sensitivity(model, ranges, placement, base, ctx)]
    if min_sqnr is None:
        return set(ranked[:keep_fp])
    reference = _outputs(model, ctx)

    def sqnr_keeping(count: int) -> float:
        keep = frozenset(ranked[:count])
        return quantized_sqnr(model, ranges, placement, Selection(base.exclude, base.exclude_ops, base.keep_first,
                                                                  base.keep_last, keep), reference, ctx)

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
