"""The optimization report: what ran, with which options and versions, and what it did to the model.

`build_report` turns an OptimizeResult into a plain dict (the JSON schema below), `to_json` prints it
deterministically (sorted keys; per-pass and total timings are the only fields that differ between
two runs), `format_text` renders the same data as tables for people, and `write_report` writes
the JSON atomically (temporary file in the destination folder, then rename).

    {"schema": 1, "input": ..., "output": ..., "pipeline": "<canonical text>",
     "passes": [{"name", "options": {kebab-key: value, ...every option...}}],
     "versions": {"irtool", "onnx", "onnxruntime", "python"}, "seed", "input_shapes",
     "opset": {"input": <the loaded model's>, "output": <the written model's: after any upgrade on load
               (irtool.ir.io.upgrade_opset) or by a pass (fp16 takes a quantized model to opset 19)>},
     "records": [{"name", "options", "modified", "seconds", "stats"}], "total_seconds",
     "before": METRICS, "after": METRICS, "ratios": {metric: after / before or null}}
    METRICS = {"nodes", "params", "nonzero_params", "weight_bytes", "macs", "peak_activation_bytes",
               "op_histogram", "unknown_macs", "unsupported_ops"}
"""

from __future__ import annotations

import enum
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RATIO_METRICS = ("nodes", "params", "nonzero_params", "weight_bytes", "macs", "peak_activation_bytes")
_BYTE_METRICS = {"weight_bytes", "peak_activation_bytes"}


def build_report(result: Any, input_path: str | os.PathLike | None = None,
                 output_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report of an irtool.api.OptimizeResult as JSON-ready data."""
    before, after = cost_metrics(result.before), cost_metrics(result.after)
    records = [record_dict(r) for r in result.records]
    return {
        "schema": SCHEMA_VERSION,
        "input": None if input_path is None else str(input_path),
        "output": None if output_path is None else str(output_path),
        "pipeline": result.pipeline_text,
        "passes": [{"name": spec.name, "options": kebab_options(dict(spec.options))}
                   for spec in result.pipeline.passes],
        "versions": versions(),
        "seed": result.seed,
        "input_shapes": {k: list(v) for k, v in result.input_shapes.items()},
        "cost_input_shapes": {k: list(v) for k, v in getattr(result, "cost_input_shapes", {}).items()},
        "opset": {"input": result.model.source_opset, "output": result.model.opset},
        "records": records,
        "total_seconds": round(sum(r["seconds"] for r in records), 6),
        "before": before,
        "after": after,
        "ratios": ratios(before, after),
    }


def cost_metrics(cost: Any) -> dict[str, Any]:
    """Report metrics from an irtool.analysis.cost.CostReport."""
    histogram = {str(op): int(n) for op, n in sorted(cost.op_histogram.items())}
    return {
        "nodes": sum(histogram.values()),
        "params": int(cost.total_params),
        "nonzero_params": int(cost.nonzero_params),
        "weight_bytes": int(cost.weight_bytes),
        "macs": int(cost.total_macs),
        "peak_activation_bytes": int(cost.peak_activation_bytes),
        "op_histogram": histogram,
        "unknown_macs": sorted(str(name) for name in cost.unknown_macs),
        "unsupported_ops": sorted(str(op) for op in getattr(cost, "unsupported_ops", ())),
    }


def ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    # None rather than inf/NaN: JSON has neither, and "no baseline" is what it means.
    return {key: (round(after[key] / before[key], 6) if before[key] else None) for key in RATIO_METRICS}


def record_dict(record: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "options": kebab_options(record.options),
        "modified": bool(record.modified),
        "seconds": round(float(record.seconds), 6),
        "stats": {str(k): jsonable(v) for k, v in sorted(record.stats.items())},
    }


def kebab_options(options: dict[str, Any]) -> dict[str, Any]:
    """Option names as users type them in pipeline text."""
    return {key.replace("_", "-"): jsonable(value) for key, value in sorted(options.items())}


def jsonable(value: Any) -> Any:
    """Plain JSON values from option and stat values (enums, tuples, numpy scalars, str subclasses)."""
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
                                  and value.dtype.kind in "iub"):
        return int(value)
    if isinstance(value, float) or hasattr(value, "dtype"):
        return float(value)
    return str(value)


def versions() -> dict[str, str]:
    # Read from the installed metadata: importing onnxruntime just for its version costs ~0.3 s.
    found = {"python": platform.python_version()}
    for dist in ("irtool", "onnx", "onnxruntime"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n"


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), to_json(report))


def write_text_atomic(path: Path, text: str) -> None:
    from irtool.ir.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------- text form
def _upgraded_where(opset: dict[str, int]) -> str:
    """On load (below io.MIN_OPSET), by a pass (fp16 takes a quantized model to opset 19), or both."""
    from irtool.ir.io import MIN_OPSET

    where = ["on load"] if opset["input"] < MIN_OPSET else []
    if opset["output"] > max(opset["input"], MIN_OPSET):
        where.append("by the pipeline")
    return " and ".join(where)


def format_text(report: dict[str, Any]) -> str:
    """Tables for people: header, metrics before/after with ratios, passes, op histogram changes."""
    lines = [f"irtool {report['versions']['irtool']}: {report['input']} -> {report['output']}",
             f"pipeline: {report['pipeline']}", ""]
    opset = report.get("opset", {})
    if opset.get("input") != opset.get("output"):
        lines[-1:-1] = [f"opset: {opset['input']} -> {opset['output']} (upgraded {_upgraded_where(opset)})"]
    lines += format_metrics(report["before"], report["after"], report["ratios"])
    lines += ["", *format_records(report["records"])]
    changes = format_histogram_changes(report["before"]["op_histogram"], report["after"]["op_histogram"])
    if changes:
        lines += ["", *changes]
    unknown = report["after"]["unknown_macs"]
    if unknown:
        # Usually symbolic input dims; without this hint a MAC count of 0 reads as "free".
        lines += ["", f"MACs unknown for {len(unknown)} node(s); give --input-shape NAME:DxD.. to count them"]
    return "\n".join(lines) + "\n"


def format_metrics(before: dict, after: dict, ratio: dict) -> list[str]:
    rows = [("metric", "before", "after", "ratio")]
    for key in RATIO_METRICS:
        rows.append((key.replace("_", " "), metric_text(key, before[key]), metric_text(key, after[key]),
                     "-" if ratio[key] is None else f"{ratio[key]:.3f}"))
    return table(rows, align="<>>>")


def metric_text(key: str, value: int) -> str:
    return human_bytes(value) if key in _BYTE_METRICS else f"{value:,}"


def format_records(records: list[dict]) -> list[str]:
    rows = [("#", "pass", "modified", "seconds", "stats")]
    for index, r in enumerate(records, start=1):
        stats = ", ".join(f"{k}={v}" for k, v in r["stats"].items())
        rows.append((str(index), r["name"], "yes" if r["modified"] else "no", f"{r['seconds']:.3f}", stats))
    return table(rows, align="><<><")


def format_histogram_changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    rows = [("op", "before", "after")]
    for op in sorted(set(before) | set(after)):
        if before.get(op, 0) != after.get(op, 0):
            rows.append((op, str(before.get(op, 0)), str(after.get(op, 0))))
    return table(rows, align="<>>") if len(rows) > 1 else []


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def table(rows: list[tuple[str, ...]], align: str) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(width) if side == ">" else cell.ljust(width)
                 for cell, width, side in zip(row, widths, align, strict=True)]
        out.append("  ".join(cells).rstrip())
    return out
