"""Textual pipelines with typed options (MLIR-style):

    fold-bn,prune{ratio=0.5,round-to=8},calibrate{method=entropy},insert-qdq{profile=trt}

Grammar:  pipeline := item (',' item)* ;  item := NAME ['{' [opt (',' opt)*] '}'] ;
          opt := KEY '=' value ;  value := BARE | QUOTED | '[' [value (',' value)*] ']'
BARE runs up to one of `,{}[]=` or whitespace; QUOTED is '...' or "..." with backslash escapes,
for regexes and other text holding those characters. Keys are the kebab-case names of the pass's
Options fields; values are coerced from the field annotations (int, float, bool, str, Regex, Enum,
tuple/list of those, X | None). A name that is a registered pipeline expands in place; options given
to it go to every pass in it that has them (`quant{exclude=^head}`). `format_pipeline` prints the
canonical text, non-default options only, and parse(format(p)) == p.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from irtool import registry
from irtool.errors import PipelineError


class Regex(str):
    """An option holding a regular expression; validated when the pipeline is parsed."""


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def build(self):
        cls = registry.get_pass(self.name)
        return cls(cls.Options(**dict(self.options)))


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassSpec, ...]

    def build(self) -> list:
        return [spec.build() for spec in self.passes]

    def __str__(self) -> str:
        return format_pipeline(self)


# ----------------------------------------------------------------------------------- tokenizer
_SPECIAL = ",{}[]="


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, message: str, pos: int | None = None) -> PipelineError:
        col = (self.pos if pos is None else pos) + 1
        return PipelineError(f"pipeline {self.text!r}, column {col}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {char!r} {what}, found {found}")
        self.pos += 1

    def bare(self, what: str) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _SPECIAL \
                and not self.text[self.pos].isspace() and self.text[self.pos] not in "'\"":
            self.pos += 1
        if start == self.pos:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        return self.text[start:self.pos]

    def quoted(self) -> str:
        quote, start = self.text[self.pos], self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            out.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            raise self.error("unterminated quoted value", start)
        self.pos += 1
        return "".join(out)

    def value(self) -> str | list:
        char = self.peek()
        if char in ("'", '"'):
            return _Quoted(self.quoted())
        if char == "[":
            self.pos += 1
            items: list = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]", "to close the list")
                return items
        return self.bare("an option value")


class _Quoted(str):
    """A value that was quoted in the text (so 'none' stays the string 'none')."""


# ----------------------------------------------------------------------------------- parsing
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text into a Pipeline; raise PipelineError pointing at the column on bad text."""
    return Pipeline(tuple(_parse(text, expanding=())))


def _parse(text: str, expanding: tuple[str, ...]) -> list[PassSpec]:
    reader = _Reader(text)
    if not text.strip():
        raise reader.error("empty pipeline")
    specs: list[PassSpec] = []
    while True:
        start = (reader.skip_space(), reader.pos)[1]
        name = reader.bare("a pass name")
        if not _NAME.match(name):
            raise reader.error(f"{name!r} is not a kebab-case pass name", start)
        raw: list[tuple[str, Any, int]] = []
        if reader.peek() == "{":
            reader.pos += 1
            raw = _parse_options(reader)
        specs.extend(_resolve(name, raw, reader, start, expanding))
        if reader.peek() == "":
            return specs
        reader.expect(",", "between passes")


def _parse_options(reader: _Reader) -> list[tuple[str, Any, int]]:
    raw: list[tuple[str, Any, int]] = []
    if reader.peek() == "}":
        reader.pos += 1
        return raw
    while True:
        reader.skip_space()
        key_pos = reader.pos
        key = reader.bare("an option key")
        reader.expect("=", f"after option key {key!r}")
        raw.append((key, reader.value(), key_pos))
        if reader.peek() == ",":
            reader.pos += 1
            continue
        reader.expect("}", "to close the options")
        return raw


def _resolve(name: str, raw: list, reader: _Reader, start: int, expanding: tuple[str, ...]) -> list[PassSpec]:
    if name not in registry.pass_names():
        named = registry.get_pipeline(name)
        if named is not None:
            if name in expanding:
                raise PipelineError(f"named pipeline {name!r} expands to itself ({' -> '.join(expanding + (name,))})")
            return _forward_options(name, _parse(named, expanding + (name,)), raw, reader)
    try:
        cls = registry.get_pass(name)
    except PipelineError as e:
        raise reader.error(str(e), start) from e
    return [PassSpec(name, _coerce_options(cls, raw, reader))]


def _forward_options(name: str, specs: list[PassSpec], raw: list, reader: _Reader) -> list[PassSpec]:
    """`quant{exclude=...}`: each option goes to every pass of the named pipeline that has it, over the options
    the pipeline gives that pass (`quant{min-sqnr=30}` replaces insert-qdq's 20)."""
    seen = set()
    for key, _, pos in raw:
        takers = [spec.name for spec in specs if key.replace("-", "_") in _fields(registry.get_pass(spec.name))]
        if not takers:
            passes = ", ".join(dict.fromkeys(spec.name for spec in specs))
            raise reader.error(f"no pass of named pipeline {name!r} takes option {key!r} (its passes: {passes})", pos)
        if key in seen:
            raise reader.error(f"option {key!r} given twice", pos)
        seen.add(key)
    out = []
    for spec in specs:
        fields = _fields(registry.get_pass(spec.name))
        mine = [item for item in raw if item[0].replace("-", "_") in fields]
        out.append(PassSpec(spec.name, _coerce_options(registry.get_pass(spec.name), mine, reader, dict(spec.options)))
                   if mine else spec)
    return out


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls.Options)}


def _coerce_options(cls, raw: list, reader: _Reader, base: dict[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """The pass's options from `raw`, over `base` (the options a named pipeline gives it) when given."""
    fields = _fields(cls)
    hints = typing.get_type_hints(cls.Options)
    values: dict[str, Any] = dict(base or {})
    given = set()
    for key, value, pos in raw:
        field_name = key.replace("-", "_")
        if field_name not in fields:
            valid = [f.replace("_", "-") for f in fields]
            raise reader.error(registry.unknown_message("option", key, valid, f" of pass {cls.name!r}"), pos)
        if field_name in given:
            raise reader.error(f"option {key!r} given twice", pos)
        given.add(field_name)
        try:
            values[field_name] = coerce(value, hints[field_name])
        except (ValueError, TypeError) as e:
            raise reader.error(f"option {key!r} of pass {cls.name!r}: {e}", pos) from e
    try:
        options = cls.Options(**values)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"pass {cls.name!r}: {e}") from e
    # Specs hold every option (defaults filled in) so equal pipelines compare equal however spelled.
    return tuple((f.name, getattr(options, f.name)) for f in dataclasses.fields(options))


# ----------------------------------------------------------------------------------- coercion
def coerce(value: Any, annotation: Any) -> Any:
    """Turn parsed text (a string or nested lists) into a value of `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and isinstance(value, str) and not isinstance(value, _Quoted) \
                and value.lower() == "none":
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list):
        items = value if isinstance(value, list) else [value]
        inner = args[0] if args else str
        return tuple(coerce(v, inner) for v in items)
    if isinstance(value, list):
        raise ValueError(f"expected a single {_type_name(annotation)}, got a list")
    return _coerce_scalar(str(value), annotation)


def _coerce_scalar(text: str, annotation: Any) -> Any:
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _coerce_enum(text, annotation)
    if annotation is Regex:
        try:
            re.compile(text)
        except re.error as e:
            raise ValueError(f"invalid regular expression {text!r}: {e}") from e
        return Regex(text)
    if annotation is str:
        return str(text)
    raise TypeError(f"options of type {_type_name(annotation)} cannot be set from text")


def _coerce_enum(text: str, annotation: type[enum.Enum]) -> enum.Enum:
    for member in annotation:
        if text.lower() in (str(member.value).lower(), member.name.lower()):
            return member
    valid = ", ".join(str(m.value) for m in annotation)
    raise ValueError(f"expected one of {valid}, got {text!r}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


# ----------------------------------------------------------------------------------- printing
def format_pipeline(pipeline: Pipeline) -> str:
    return ",".join(format_spec(spec) for spec in pipeline.passes)


def format_spec(spec: PassSpec) -> str:
    cls = registry.get_pass(spec.name)
    defaults = {f.name: _default(f) for f in _fields(cls).values()}
    shown = [(k, v) for k, v in spec.options if k not in defaults or defaults[k] != v]
    if not shown:
        return spec.name
    body = ",".join(f"{k.replace('_', '-')}={format_value(v)}" for k, v in shown)
    return f"{spec.name}{{{body}}}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        text = str(value.value)  # an enum value is never None, so a bare `none` member stays bare
        return text if text and not any(c in _SPECIAL or c.isspace() or c in "'\"\\" for c in text) \
            else format_value(text)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if text and not any(c in _SPECIAL or c.isspace() or c in "'\"\\" for c in text) and text.lower() != "none":
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def spec_from_pass(p) -> PassSpec:
    """The spec of an already-built pass (for reports)."""
    values = {f.name: getattr(p.options, f.name) for f in dataclasses.fields(p.options)}
    return PassSpec(p.name, tuple(sorted(values.items())))
