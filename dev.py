#!/usr/bin/env python3
"""Set-up and entry points for a fresh clone: `python3 dev.py demo` and `python3 dev.py test`.

Both create .venv (once), install the project with its dev extras and the CPU build of torch (again
only when one of INSTALL_FILES changed: the install files and the compiled kernel's source), then run inside
that environment. Only the standard library is used here, because this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".irtool-install-stamp"
INSTALL_FILES = ("pyproject.toml", "requirements-dev.txt", "setup.py", "irtool/calibration/_binning.c")


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _install_hash() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_FILES:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_env() -> Path:
    if not _python().exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = _install_hash()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        print("installing irtool and its dev dependencies into .venv ...", flush=True)
        pip = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, cwd=ROOT)
        subprocess.run([*pip, "-r", "requirements-dev.txt"], check=True, cwd=ROOT)
        STAMP.write_text(wanted)
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "bench", "env"}:
        print("usage: python3 dev.py {demo|test|bench|env} [args...]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    python = str(ensure_env())
    if command == "env":
        return 0
    if command == "demo":
        return subprocess.run([python, "examples/quickstart.py", *rest], cwd=ROOT).returncode
    if command == "bench":
        return subprocess.run([python, "bench/run_all.py", *rest], cwd=ROOT).returncode
    lint = subprocess.run([python, "-m", "ruff", "check", "irtool", "passes", "tests", "bench", "examples"],
                          cwd=ROOT)
    if lint.returncode != 0:
        return lint.returncode
    return subprocess.run([python, "-m", "pytest", "-q", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
