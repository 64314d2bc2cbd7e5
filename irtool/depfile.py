"""`irtool opt --depfile FILE` and `irtool export --depfile FILE`: the files a run read, in the Make syntax that
GNU Make (`-include`), Ninja (`depfile =`) and CMake's add_custom_command(DEPFILE) read. A build step that lists
only the model as its input reruns when the model changes; with the depfile it also reruns when the model's
external data or the calibration data change (an .npz, every file of a folder and the folder itself, so that an
added or removed file counts, or the .py of file.py:NAME). `export`'s lists the module's source and every module
it imported from outside the Python installation (a models.py and the layers.py it imports). The only target is
OUT. The depfile is written after OUT, atomically like every output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx

from irtool.ir.io import atomic_write_bytes, external_locations
from irtool.usercode import is_file_spec


def model_files(path: str | os.PathLike) -> list[str]:
    """The model file and the external data files its tensors name, beside it."""
    proto = onnx.load_model(str(path), load_external_data=False)
    base = os.path.dirname(str(path))
    return [str(path)] + [os.path.join(base, location) for location in external_locations(proto)]


def calibration_files(spec: str | None) -> list[str]:
    """What --calib-data read: nothing for none or `random`; a folder and every file below it; the .py of a
    file.py:NAME (not what that function reads itself); a file."""
    if spec is None or spec == "random":
        return []
    if is_file_spec(spec):
        return [spec.rpartition(":")[0]]
    path = Path(spec)
    if path.is_dir():
        return [spec] + sorted(str(f) for f in path.rglob("*") if f.is_file())
    return [spec] if path.is_file() else []


def imported_files(before: set[str]) -> list[str]:
    """The source files of the modules imported since `before` (a snapshot of sys.modules' names) that lie outside
    the Python installation and its environment: the user's code, not torch's, nor irtool's own (an editable
    install lies outside too)."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    files = set()
    for name in set(sys.modules) - before:
        if name.startswith("__") or name.split(".")[0] == "irtool":  # __main__, multiprocessing's __mp_main__
            continue
        source = getattr(sys.modules.get(name), "__file__", None)
        # torch.ops and torch.classes name made-up relative files
        if source and source.endswith(".py") and os.path.isabs(source) and os.path.isfile(source):
            real = os.path.realpath(source)
            if not any(real.startswith(prefix + os.sep) for prefix in installed):
                files.add(_relative(real))
    return sorted(files)


def _relative(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _escaped(path: str) -> str:
    # Make and Ninja read "\ " as a space in a name and "$$" as "$"; "#" would start a comment for Make.
    return path.replace("\\", "/").replace("$", "$$").replace("#", "\\#").replace(" ", "\\ ")


def render(target: str, deps: list[str]) -> str:
    """The rule, then an empty rule per dependency (as gcc -MP writes them): a calibration file deleted later
    is then out of date instead of stopping Make with "No rule to make target"."""
    unique = list(dict.fromkeys(deps))
    rule = f"{_escaped(target)}:" + "".join(f" \\\n  {_escaped(d)}" for d in unique) + "\n"
    return rule + "".join(f"\n{_escaped(d)}:\n" for d in unique)


def write(path: str | os.PathLike, target: str, deps: list[str]) -> None:
    atomic_write_bytes(Path(path), render(target, deps).encode())
