"""Helpers for CLI tests: run the real `irtool` in a subprocess, and plugin folders importlib finds.

Plugins are made discoverable without pip: a `<dist>.dist-info` folder holding METADATA and
entry_points.txt on PYTHONPATH is all importlib.metadata needs to list a distribution's entry points.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.cli.models import write_tiny

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = ROOT / "examples" / "custom_pass"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irtool", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The CLI's contract for failures: exit code, exactly one stderr line, no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("irtool: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "tiny.onnx")


def write_dist_info(site: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    text = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                   for group, eps in entry_points.items())
    info.joinpath("entry_points.txt").write_text(text)


FAILING_PLUGIN = '''
from dataclasses import dataclass
from irtool.passmanager import Pass


class FailingPass(Pass):
    """Always raises, to test how the CLI reports a failing pass."""

    name = "fail-test"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model, ctx):
        raise RuntimeError("boom")
'''

BROKEN_PLUGIN = 'raise ImportError("needs libexample.so, which is not installed")\n'


def _example_entry_points() -> dict[str, dict[str, str]]:
    # Read from the example's own pyproject so the test exercises what `pip install` would register.
    project = tomllib.loads((EXAMPLE_PLUGIN / "pyproject.toml").read_text())["project"]
    return {group: dict(eps) for group, eps in project["entry-points"].items()}


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment in which the example plugin, a failing pass and a broken plugin are installed."""
    site = tmp_path_factory.mktemp("plugins")
    write_dist_info(site, "irtool-example-plugin", "0.1.0", _example_entry_points())
    write_dist_info(site, "failing-plugin", "0.0.1", {"irtool.passes": {"fail-test": "failing_plugin:FailingPass"}})
    write_dist_info(site, "broken-plugin", "0.0.1", {"irtool.passes": {"broken-pass": "broken_plugin:BrokenPass"}})
    (site / "failing_plugin.py").write_text(FAILING_PLUGIN)
    (site / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(EXAMPLE_PLUGIN), env.get("PYTHONPATH")]))
    return env
