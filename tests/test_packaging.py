"""pyproject.toml lists packages explicitly (passes/ ships as irtool.passes); every package folder must be
listed, or a regular (non-editable) install would silently miss it."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> set[str]:
    found = set()
    for top, name in (("irtool", "irtool"), ("passes", "irtool.passes")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *relative)))
    return found


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(config["tool"]["setuptools"]["packages"]) == package_folders()
