"""The golden harness itself (golden/conftest.py) fails when it should: IR drift shows a unified
diff, a broken contract and a wrong `modified` expectation are reported, --update-golden writes files."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[2] / "golden"


def _harness():
    spec = importlib.util.spec_from_file_location("golden_harness_under_test", GOLDEN / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


harness = _harness()


@pytest.fixture
def case(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(harness, "GOLDEN_ROOT", tmp_path)
    target = tmp_path / "dce" / "dead_branch"
    shutil.copytree(GOLDEN / "dce" / "dead_branch", target)
    return target


def test_unchanged_case_passes(case):
    harness.run_case(case, update=False)


def test_ir_drift_fails_with_a_unified_diff(case):
    ir = case / "expected.ir"
    ir.write_text(ir.read_text().replace("Relu[Relu_0]", "Relu[Relu_9]"))
    with pytest.raises(harness.GoldenMismatch) as info:
        harness.run_case(case, update=False)
    assert "-  %y : f32[2,3] = Relu[Relu_9](%a)" in str(info.value)
    assert "+  %y : f32[2,3] = Relu[Relu_0](%a)" in str(info.value)


def test_update_rewrites_expected_files(case):
    (case / "expected.ir").unlink()
    (case / "expected_outputs.npz").unlink()
    harness.run_case(case, update=True)
    assert (case / "expected.ir").read_text() == (GOLDEN / "dce" / "dead_branch" / "expected.ir").read_text()
    harness.run_case(case, update=False)


def test_wrong_modified_expectation_fails(case):
    (case / "expect.txt").write_text("modified: false\n")
    with pytest.raises(harness.GoldenMismatch, match="expected modified=False"):
        harness.run_case(case, update=False)


def test_contract_violation_fails():
    contract = harness.Contract.parse("bounded 1e-3")
    ref = [{"y": np.zeros(3, np.float32)}]
    harness.check_contract(contract, ref, [{"y": np.full(3, 1e-4, np.float32)}])
    with pytest.raises(harness.GoldenMismatch, match="max abs error"):
        harness.check_contract(contract, ref, [{"y": np.full(3, 1e-2, np.float32)}])
    with pytest.raises(harness.GoldenMismatch, match="contract exact"):
        harness.check_contract(harness.Contract.parse("exact"), ref, [{"y": np.full(3, 1e-7, np.float32)}])


def test_malformed_contract_is_refused():
    with pytest.raises(harness.GoldenMismatch, match="contract.txt"):
        harness.Contract.parse("roughly")
