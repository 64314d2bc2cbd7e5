"""Loading a name from the user's own Python: `path/to/file.py:NAME` or `package.module:NAME`.

`irtool export` takes a PyTorch module this way and `--calib-data` a calibration data provider. Running the
file is the point (it is the user's model or data code, as a build step would run it); its errors, on import
or when the name is missing, are one-line InputErrors.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from irtool.errors import InputError


def is_file_spec(text: str) -> bool:
    """Whether `text` reads as path/to/file.py:NAME (what --calib-data and irtool opt tell from a path)."""
    source, sep, name = text.rpartition(":")
    return bool(sep) and name.isidentifier() and source.endswith(".py")


def load_name(spec: str, what: str) -> Any:
    """The object NAME of `spec`; `what` says what the option expects, for the messages."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise InputError(f"{what} {spec!r}: expected path/to/file.py:NAME or package.module:NAME")
    namespace = _import_source(source, spec, what)
    if not hasattr(namespace, name):
        raise InputError(f"{what} {spec!r}: {source} has no {name!r}")
    return getattr(namespace, name)


def first_line(e: BaseException) -> str:
    """The first line of the innermost cause (torch.onnx wraps its reason in "Failed to export ... step 1/3"),
    without terminal colour codes, after its type."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _import_source(source: str, spec: str, what: str) -> Any:
    path = Path(source)
    try:
        if source.endswith(".py") or "/" in source or "\\" in source:
            if not path.is_file():
                raise InputError(f"{what} {spec!r}: {source}: no such file")
            loader_spec = importlib.util.spec_from_file_location(f"irtool_user_{path.stem}", path)
            namespace = importlib.util.module_from_spec(loader_spec)
            folder = str(path.resolve().parent)
            sys.path.insert(0, folder)  # the file's own imports of its neighbours
            try:
                loader_spec.loader.exec_module(namespace)
            finally:
                sys.path.remove(folder)
            return namespace
        return importlib.import_module(source)
    except InputError:
        raise
    except Exception as e:  # the user's code: any error it raises on import is reported, not a traceback
        raise InputError(f"{what} {spec!r}: importing {source} failed: {first_line(e)}") from e
