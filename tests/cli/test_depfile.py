"""`irtool opt --depfile`: what it lists, its syntax, and the build files in examples/build_systems run by Make,
Ninja and CMake (both generators): a second build does nothing, and new calibration data builds again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from irtool import depfile
from tests.cli.conftest import ROOT, assert_one_line_error, run_cli

EXAMPLE = ROOT / "examples" / "build_systems"
IRTOOL = Path(sys.executable).with_name("irtool")


def _inputs(folder: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLE / "make_inputs.py"), str(folder)], check=True)


def _opt(tmp_path: Path, *extra: str) -> list[str]:
    """Run opt with --depfile and return the dependencies of OUT as the depfile lists them."""
    result = run_cli("opt", "model.onnx", "-o", "out.onnx", "--passes", "cleanup", "--depfile", "out.d", *extra,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out.d").read_text()
    rule, *phony = text.split("\n\n")
    target, deps = rule.replace("\\\n", " ").split(":", 1)
    assert target == "out.onnx"
    assert [p.strip() for p in phony] == [f"{d}:" for d in deps.split()]  # one empty rule per dependency
    return deps.split()


def test_lists_the_model_and_the_calibration_data(tmp_path):
    _inputs(tmp_path)
    assert _opt(tmp_path) == ["model.onnx"]
    assert _opt(tmp_path, "--calib-data", "calib.npz") == ["model.onnx", "calib.npz"]
    assert _opt(tmp_path, "--calib-data", "random") == ["model.onnx"]
    folder = tmp_path / "calib"
    (folder / "more").mkdir(parents=True)
    images = np.load(tmp_path / "calib.npz")["image"]
    np.save(folder / "b.npy", images[:4])
    np.save(folder / "more" / "a.npy", images[4:8])
    assert _opt(tmp_path, "--calib-data", "calib") == ["model.onnx", "calib", "calib/b.npy", "calib/more/a.npy"]
    (tmp_path / "data.py").write_text("import numpy as np\n\ndef samples():\n"
                                      "    return [{'image': np.zeros((1, 3, 16, 16), np.float32)}]\n")
    assert _opt(tmp_path, "--calib-data", "data.py:samples") == ["model.onnx", "data.py"]


def test_lists_external_data(tmp_path):
    _inputs(tmp_path)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    (tmp_path / "ext").mkdir()
    onnx.save(proto, str(tmp_path / "ext" / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    result = run_cli("opt", "ext/model.onnx", "-o", "out.onnx", "--passes", "cleanup", "--depfile", "out.d",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ext/weights.bin" in (tmp_path / "out.d").read_text().split(":", 1)[1]


def test_escapes_what_make_and_ninja_read_specially():
    text = depfile.render("out dir/m.onnx", ["a b.onnx", "c$d#.npz"])
    assert text.splitlines()[0] == "out\\ dir/m.onnx: \\"
    assert "  a\\ b.onnx \\" in text and "  c$$d\\#.npz\n" in text


def test_no_depfile_when_the_run_fails_and_refused_paths(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    result = run_cli("opt", "junk.onnx", "-o", "out.onnx", "--passes", "cleanup", "--depfile", "out.d", cwd=tmp_path)
    assert_one_line_error(result, 2)
    assert not (tmp_path / "out.d").exists() and not (tmp_path / "out.onnx").exists()
    _inputs(tmp_path)
    result = run_cli("opt", "model.onnx", "-o", "out.onnx", "--passes", "cleanup", "--depfile", "model.onnx",
                     cwd=tmp_path)
    assert_one_line_error(result, 2, "the depfile would overwrite a model")
    result = run_cli("opt", "model.onnx", "-o", "out.onnx", "--passes", "cleanup", "--depfile", "r.json",
                     "--report", "r.json", cwd=tmp_path)
    assert_one_line_error(result, 2, "the depfile would overwrite the report")


def _build_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    _inputs(folder)
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{IRTOOL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _check_rebuilds(build, output: Path, calib: Path) -> None:
    """First build writes the model, a second leaves it alone, newer calibration data rebuilds it."""
    build()
    assert output.exists()
    first = output.stat().st_mtime_ns
    build()
    assert output.stat().st_mtime_ns == first
    later = first + 5 * 10**9
    os.utime(calib, ns=(later, later))
    build()
    assert output.stat().st_mtime_ns != first


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU Make is not installed")
def test_make_rebuilds_on_new_calibration_data(tmp_path):
    folder = _build_folder(tmp_path)

    def build():
        subprocess.run(["make", "-s", f"IRTOOL={IRTOOL}"], cwd=folder, check=True, capture_output=True)

    _check_rebuilds(build, folder / "model.int8.onnx", folder / "calib.npz")
    assert "calib.npz" in (folder / "model.int8.onnx.d").read_text()


@pytest.mark.skipif(shutil.which("ninja") is None, reason="Ninja is not installed")
def test_ninja_rebuilds_on_new_calibration_data(tmp_path):
    folder = _build_folder(tmp_path)

    def build():
        subprocess.run(["ninja", "-f", "build.ninja"], cwd=folder, check=True, capture_output=True, env=_env())

    _check_rebuilds(build, folder / "model.int8.onnx", folder / "calib.npz")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="CMake is not installed")
@pytest.mark.parametrize("generator", ["Unix Makefiles", "Ninja"])
def test_cmake_rebuilds_on_new_calibration_data(tmp_path, generator):
    if shutil.which({"Unix Makefiles": "make", "Ninja": "ninja"}[generator]) is None:
        pytest.skip(f"{generator} is not installed")
    folder = _build_folder(tmp_path)
    build_dir = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(folder), "-B", str(build_dir), "-G", generator, f"-DIRTOOL={IRTOOL}"],
                   check=True, capture_output=True)

    def build():
        subprocess.run(["cmake", "--build", str(build_dir)], check=True, capture_output=True)

    _check_rebuilds(build, build_dir / "model.int8.onnx", folder / "calib.npz")


def test_export_lists_the_module_and_the_local_modules_it_imports(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "layers.py").write_text("from torch import nn\n\n\ndef block():\n    return nn.Linear(4, 2)\n")
    (tmp_path / "models.py").write_text("from layers import block\n\n\ndef build():\n    return block()\n")
    result = run_cli("export", "models.py:build", "-o", "model.onnx", "--input-shape", "x:1x4", "--depfile",
                     "model.d", "--exporter", "torchscript", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rule = (tmp_path / "model.d").read_text().split("\n\n")[0]
    target, deps = rule.replace("\\\n", " ").split(":", 1)
    assert target == "model.onnx" and deps.split() == ["models.py", "layers.py"]  # not torch's own files
