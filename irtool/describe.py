"""Self-description for the CLI: the pass registry (`irtool passes`) and one model (`irtool inspect`),
as JSON-ready data plus a text rendering of each. Everything is generated from the registry and the
model; nothing here is a hand-kept list.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from irtool import registry
from irtool.errors import IrtoolError
from irtool.report import RATIO_METRICS, cost_metrics, human_bytes, jsonable, metric_text, table

# ----------------------------------------------------------------------------------- registry


def describe_registry() -> dict[str, Any]:
    return {"passes": [describe_pass(name) for name in registry.pass_names()],
            "pipelines": [describe_pipeline(name) for name in registry.pipeline_names()]}


def describe_pass(name: str) -> dict[str, Any]:
    # One broken plugin must not hide the others: it is listed with its load error instead.
    try:
        cls = registry.get_pass(name)
    except IrtoolError as e:
        return {"name": name, "error": str(e)}
    hints = typing.get_type_hints(cls.Options)
    return {"name": name, "summary": cls.summary(),
            "requires": [analysis.name for analysis in cls.requires],
            "options": [describe_option(f, hints[f.name]) for f in dataclasses.fields(cls.Options)]}


def describe_option(f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """Name, type and default; `default_text` is the default as it would be typed in pipeline text."""
    from irtool.pipeline import format_value

    entry = {"name": f.name.replace("_", "-"), "type": type_text(annotation)}
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        entry["required"] = True
        return entry
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    entry["default"] = jsonable(default)
    entry["default_text"] = format_value(default)
    return entry


def type_text(annotation: Any) -> str:
    """How an option's type reads in help text: `float`, `list[regex]`, `minmax|entropy`, `float|none`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join("none" if a is type(None) else type_text(a) for a in args)
    if origin in (tuple, list):
        return f"list[{type_text(args[0]) if args else 'str'}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(str(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation)).lower()


def describe_pipeline(name: str) -> dict[str, Any]:
    try:
        return {"name": name, "expansion": registry.get_pipeline(name)}
    except IrtoolError as e:
        return {"name": name, "error": str(e)}


def format_registry(data: dict[str, Any]) -> str:
    lines = ["passes:"]
    width = max((len(p["name"]) for p in data["passes"]), default=0)
    for entry in data["passes"]:
        if "error" in entry:
            lines.append(f"  {entry['name']:<{width}}  [unavailable: {entry['error']}]")
            continue
        lines.append(f"  {entry['name']:<{width}}  {entry['summary']}")
        for option in entry["options"]:
            default = "required" if option.get("required") else f"= {option['default_text']}"
            lines.append(f"  {'':<{width}}    {option['name']}: {option['type']} {default}")
    lines.append("pipelines:")
    for entry in data["pipelines"]:
        expansion = entry["expansion"] if "expansion" in entry else f"[unavailable: {entry['error']}]"
        lines.append(f"  {entry['name']} = {expansion}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- one model
def describe_model(model: Any, input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Cost metrics plus typed inputs/outputs of an irtool Model. Costs are per input of `cost_input_shapes`:
    the shapes given, and symbolic dims counted as 1 (as `irtool opt` reports them), so that a dynamic batch does
    not leave every MAC unknown."""
    from irtool.analysis.cost import model_cost
    from irtool.analysis.shapes import concrete_input_shapes
    from irtool.api import check_input_shapes
    from irtool.ir.skeleton import infer_types

    check_input_shapes(model, input_shapes)
    known = infer_types(model.shape_inference_proto(), input_shapes or None)
    cost_shapes = concrete_input_shapes(model, input_shapes)
    # "opset" is the file's; a model below opset 13 is analysed upgraded (irtool.ir.io.upgrade_opset).
    data = {"opset": model.source_opset, "analysed_opset": model.opset, "ir_version": int(model.graph.ir_version or 0),
            "inputs": [_value(t.name, known) for t in model.graph.inputs],
            "outputs": [_value(t.name, known) for t in model.graph.outputs],
            "cost_input_shapes": {name: list(dims) for name, dims in cost_shapes.items()}}
    data.update(cost_metrics(model_cost(model, cost_shapes or None)))
    return data


def _value(name: str, known: dict) -> dict[str, Any]:
    from irtool.ir.printer import dtype_name

    elem, dims = known.get(name, (0, None))
    return {"name": name, "dtype": dtype_name(elem) if elem else None,
            "shape": None if dims is None else list(dims)}


def format_model_summary(data: dict[str, Any]) -> str:
    upgraded = f", analysed at opset {data['analysed_opset']}" if data["analysed_opset"] != data["opset"] else ""
    lines = [f"model {data['model']} (opset {data['opset']}{upgraded}, ir version {data['ir_version']})"]
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        lines += [f"  {v['name']}: {v['dtype'] or '?'}{_shape_text(v['shape'])}" for v in data[kind]]
    rows = [(key.replace("_", " "), metric_text(key, data[key])) for key in RATIO_METRICS]
    lines += table(rows, align="<>")
    pinned = {v["name"]: data["cost_input_shapes"][v["name"]] for v in data["inputs"]
              if v["name"] in data.get("cost_input_shapes", {}) and v["shape"] != data["cost_input_shapes"][v["name"]]}
    if pinned:
        shapes = ", ".join(f"{name}:{'x'.join(map(str, dims)) or 'scalar'}" for name, dims in pinned.items())
        lines.append(f"costs per input of {shapes} (symbolic dims counted as 1; --input-shape to choose)")
    lines.append("op histogram:")
    lines += [f"  {op:<24} {count:>6}" for op, count in data["op_histogram"].items()]
    if data["unknown_macs"]:
        lines.append(f"MACs unknown for: {', '.join(data['unknown_macs'])}")
    return "\n".join(lines) + "\n"


def _shape_text(shape: list | None) -> str:
    return "[?]" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def format_mapping(data: Any, indent: str = "") -> str:
    """Nested dicts/lists as indented `key: value` lines (for backend results of any shape)."""
    lines: list[str] = []
    items = sorted(data.items()) if isinstance(data, dict) else list(enumerate(data))
    for key, value in items:
        if isinstance(value, (dict, list)) and value and not _is_scalar_list(value):
            lines.append(f"{indent}{key}:")
            lines.append(format_mapping(value, indent + "  ").rstrip("\n"))
        else:
            lines.append(f"{indent}{key}: {_scalar_text(key, value)}")
    return "\n".join(lines) + "\n"


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)


def _scalar_text(key: Any, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and str(key).endswith("bytes"):
        return human_bytes(value)
    return str(value)


def format_compare(data: dict[str, Any], name_a: str, name_b: str) -> str:
    """One row per output of an ort.compare result, reference A against candidate B."""
    lines = [f"compare {name_a} (reference) vs {name_b}: {data['samples']} sample(s), "
             f"atol={data['atol']}, rtol={data['rtol']}: {'ok' if data['ok'] else 'DIFFERENT'}"]
    rows = [("output", "max_abs", "max_rel", "sqnr_db", "cosine", "top1", "ok")]
    for name, diff in sorted(data["outputs"].items()):
        metrics = [_scalar_text(key, diff[key]) for key in ("max_abs", "max_rel", "sqnr_db", "cosine",
                                                            "top1_agreement")]
        rows.append((name, *metrics, "yes" if diff["ok"] else "no"))
    lines += table(rows, align="<>>>>><")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- channel groups
def describe_channel_groups(model: Any, input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The channel-groups analysis: every coupled group, its producers, and why locked ones are locked."""
    from irtool.analysis.channels import ChannelGroups
    from irtool.passmanager import PassContext

    return ChannelGroups().compute(model, PassContext(input_shapes=dict(input_shapes))).to_dict()


def format_channel_groups(data: dict[str, Any]) -> str:
    lines = [f"channel groups: {data['prunable_groups']} prunable, {data['locked_groups']} locked"]
    for group in data["groups"]:
        producers = ", ".join(group["producers"]) or "-"
        state = f"locked: {group['locked']}" if group["locked"] else "prunable"
        state += " (prune{through-norms=true} removes them)" if group.get("soft") else ""
        lines.append(f"  {group['channels']:>6} ch  {state}  producers: {producers}")
    return "\n".join(lines) + "\n"
