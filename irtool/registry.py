"""Pass and named-pipeline registry, filled from the entry-point groups `irtool.passes` and
`irtool.pipelines` (built-ins register the same way as plugins, as flake8 does) plus in-process
`register_pass` calls. Listing names imports nothing; loading a plugin that fails raises a
PluginError that names the plugin and its entry point.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from typing import TYPE_CHECKING

from irtool.errors import PipelineError, PluginError

if TYPE_CHECKING:
    from irtool.passmanager import Pass

log = logging.getLogger(__name__)

PASS_GROUP = "irtool.passes"
PIPELINE_GROUP = "irtool.pipelines"

_registered: dict[str, type[Pass]] = {}
_registered_pipelines: dict[str, str] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name in this process."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name or "_" in cls.name:
        raise ValueError(f"pass name must be kebab-case, got {cls.name!r}")
    _registered[cls.name] = cls
    return cls


def register_pipeline(name: str, text: str) -> None:
    """Make a named pipeline (expanded by the pipeline parser) available in this process."""
    _registered_pipelines[name] = text


@functools.lru_cache(maxsize=None)
def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    # Scanning installed distributions costs ~10 ms; plugins are installed between runs, not during one.
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def pass_names() -> list[str]:
    return sorted(set(_entry_points(PASS_GROUP)) | set(_registered))


def pipeline_names() -> list[str]:
    return sorted(set(_entry_points(PIPELINE_GROUP)) | set(_registered_pipelines))


def get_pass(name: str) -> type[Pass]:
    if name in _registered:
        return _registered[name]
    eps = _entry_points(PASS_GROUP)
    if name not in eps:
        raise PipelineError(unknown_message("pass", name, pass_names() + pipeline_names()))
    cls = _load(eps[name], "pass")
    from irtool.passmanager import Pass

    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PluginError(f"plugin pass {name!r} ({eps[name].value}) is not a Pass subclass")
    if cls.name != name:
        raise PluginError(f"plugin pass {name!r} ({eps[name].value}) declares name {cls.name!r}")
    _registered[name] = cls
    return cls


def get_pipeline(name: str) -> str | None:
    if name in _registered_pipelines:
        return _registered_pipelines[name]
    eps = _entry_points(PIPELINE_GROUP)
    if name not in eps:
        return None
    text = _load(eps[name], "pipeline")
    if not isinstance(text, str):
        raise PluginError(f"plugin pipeline {name!r} ({eps[name].value}) is not a pipeline text string")
    _registered_pipelines[name] = text
    return text


def _load(ep: metadata.EntryPoint, kind: str):
    try:
        return ep.load()
    except Exception as e:  # any import-time failure of third-party code
        dist = getattr(ep, "dist", None)
        where = f" from {dist.name}" if dist is not None else ""
        raise PluginError(f"cannot load {kind} plugin {ep.name!r}{where} ({ep.value}): {type(e).__name__}: {e}") from e


def unknown_message(kind: str, name: str, valid: list[str], owner: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{owner}{hint}; valid: {', '.join(sorted(valid)) or 'none'}"
