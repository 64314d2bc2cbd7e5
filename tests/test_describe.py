"""irtool.describe: option types and defaults as `irtool passes` shows them, generic result tables."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from irtool.describe import describe_option, format_mapping, type_text
from irtool.pipeline import Regex


class Method(enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class Options:
    needed: int
    ratio: float = 0.5
    method: Method = Method.ENTROPY
    exclude: tuple[Regex, ...] = ()
    budget: float | None = None
    label: str = "a b"


def describe(name: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(Options)}
    hints = {"ratio": float, "method": Method, "exclude": tuple[Regex, ...], "budget": float | None,
             "label": str, "needed": int}
    return describe_option(fields[name], hints[name])


def test_type_text():
    assert [type_text(t) for t in (float, int, bool, str, Regex, Method, tuple[Regex, ...], float | None)] == \
        ["float", "int", "bool", "str", "regex", "minmax|entropy", "list[regex]", "float|none"]


def test_describe_option_defaults_as_json_and_as_pipeline_text():
    assert describe("method") == {"name": "method", "type": "minmax|entropy", "default": "entropy",
                                  "default_text": "entropy"}
    assert describe("exclude")["default"] == [] and describe("exclude")["default_text"] == "[]"
    assert describe("budget")["default"] is None and describe("budget")["default_text"] == "none"
    assert describe("label")["default_text"] == "'a b'"
    assert describe("needed") == {"name": "needed", "type": "int", "required": True}


def test_format_mapping_nests_and_formats_numbers():
    text = format_mapping({"b": {"x": 0.123456789, "peak_bytes": 2048}, "a": [1, 2]})
    assert text.splitlines() == ["a: [1, 2]", "b:", "  peak_bytes: 2.00 KiB", "  x: 0.123457"]
