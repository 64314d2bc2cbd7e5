"""Golden-case collector: every folder under golden/ holding a `pipeline.txt` is one test item.

See golden/README.md for the case format. Per case: build the input model, verify it, run the
pipeline with verification after every pass, compare the printed IR with expected.ir, run the input
and the result in ONNX Runtime on the same seeded inputs and check the contract, then compare the
result's outputs with expected_outputs.npz. `pytest --update-golden` rewrites expected.ir and
expected_outputs.npz (the contract is still checked).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from irtool import errors
from irtool.ir.model import Model
from irtool.ir.printer import format_model
from irtool.ir.verify import verify
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import format_pipeline, parse_pipeline

GOLDEN_ROOT = Path(__file__).resolve().parent
SAMPLES = 2
CALIBRATION_SEED_OFFSET = 100
# ONNX Runtime 1.31 refuses IR versions above what it knows; onnx's make_model may stamp a newer one.
MAX_ORT_IR_VERSION = 10
# Stored outputs are compared loosely enough to survive another CPU's kernels, tightly enough to
# catch any real change; the contract against the input model is the strict check.
NPZ_RTOL, NPZ_ATOL = 1e-5, 1e-6


class GoldenMismatch(AssertionError):
    """A golden case disagrees with its expectations; the message is the whole report."""


@dataclass(frozen=True)
class Contract:
    kind: str  # exact | bounded | lossy | masked
    tolerance: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Contract:
        words = text.split()
        if words == ["exact"]:
            return cls("exact")
        if len(words) == 2 and words[0] in ("bounded", "lossy", "masked"):
            return cls(words[0], float(words[1]))
        raise GoldenMismatch(f"contract.txt must be `exact`, `bounded EPS`, `lossy BUDGET` or `masked EPS`, "
                             f"got {text!r}")


@dataclass
class Expect:
    modified: bool | None = None
    raises: str | None = None
    stats: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Expect:
        expect = cls()
        if not path.exists():
            return expect
        for line in path.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if not key or key.startswith("#"):
                continue
            if key == "modified":
                expect.modified = value.lower() == "true"
            elif key == "raises":
                expect.raises = value
            elif key.startswith("stat "):
                expect.stats[key[5:].strip()] = value
            else:
                raise GoldenMismatch(f"{path}: unknown expectation {key!r}")
        return expect


# --------------------------------------------------------------------------- pytest plumbing
def pytest_collect_file(file_path: Path, parent):
    if file_path.name == "pipeline.txt":
        return GoldenFile.from_parent(parent, path=file_path)
    return None


class GoldenFile(pytest.File):
    def collect(self):
        yield GoldenItem.from_parent(self, name=str(self.path.parent.relative_to(GOLDEN_ROOT)))


class GoldenItem(pytest.Item):
    def runtest(self) -> None:
        run_case(self.path.parent, update=bool(self.config.getoption("update_golden", False)))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GoldenMismatch):
            return f"golden case {self.name}:\n{excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"golden {self.name}"


# --------------------------------------------------------------------------- one case
def run_case(case: Path, update: bool) -> None:
    proto = load_case_model(case)
    original = Model.from_proto(proto)
    verify(original)
    expect = Expect.load(case / "expect.txt")
    pipeline_text = " ".join(line.strip() for line in (case / "pipeline.txt").read_text().splitlines()
                             if line.strip() and not line.startswith("#"))
    if expect.raises:
        check_raises(pipeline_text, original.copy(), expect.raises)
        return
    pipeline = parse_pipeline(pipeline_text)
    transformed = original.copy()
    records = PassManager(pipeline.build(), verify_each=True).run(transformed, case_context(case, proto))
    check_records(records, expect, format_model(original), format_model(transformed))
    header = f"// pipeline: {format_pipeline(pipeline)}\n"
    check_text(case / "expected.ir", header + format_model(transformed), update)
    feeds = [seeded_inputs(proto, sample) for sample in range(SAMPLES)]
    before = [run_ort(to_runnable(original.to_proto()), f) for f in feeds]
    after = [run_ort(to_runnable(transformed.to_proto()), f) for f in feeds]
    contract = Contract.parse((case / "contract.txt").read_text().strip())
    if contract.kind == "masked":
        before = masked_reference(original, pipeline, feeds)
    check_contract(contract, before, after)
    check_npz(case / "expected_outputs.npz", after, update)


def case_context(case: Path, proto: onnx.ModelProto) -> PassContext:
    """A case with `calibration.txt` ("samples N") gets N seeded samples as calibration data, one per batch
    (inputs may have a fixed batch dimension)."""
    path = case / "calibration.txt"
    if not path.exists():
        return PassContext()
    fields = path.read_text().split()
    count = int(fields[fields.index("samples") + 1])
    samples = [seeded_inputs(proto, CALIBRATION_SEED_OFFSET + i) for i in range(count)]

    return PassContext(calibration_data=lambda: iter(samples))


def masked_reference(original: Model, pipeline, feeds: list[dict]) -> list[dict]:
    """The pruning oracle: the input model with, in every weighted consumer, the input-channel weights of
    the channels the pipeline's first pass (a `prune`) removes zeroed."""
    from irtool.analysis.channels import ChannelGroups
    from tests.prune.test_prune_masking import masked

    first = pipeline.passes[0].build()
    if first.name != "prune":
        raise GoldenMismatch("contract `masked` needs a pipeline that starts with prune")
    model, ctx = original.copy(), PassContext()
    removed = first.plan(model, ctx).removed_indices(ctx.analysis(ChannelGroups, model))
    oracle = to_runnable(masked(original.to_proto(), removed))
    return [run_ort(oracle, f) for f in feeds]


def load_case_model(case: Path) -> onnx.ModelProto:
    if (case / "model.py").exists():
        module_name = "golden_case_" + "_".join(case.relative_to(GOLDEN_ROOT).parts).replace("-", "_")
        spec = importlib.util.spec_from_file_location(module_name, case / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        proto = module.build()
    elif (case / "model.onnxtxt").exists():
        proto = onnx.parser.parse_model((case / "model.onnxtxt").read_text())
    else:
        raise GoldenMismatch(f"{case}: needs model.py (with build()) or model.onnxtxt")
    return to_runnable(proto)


def to_runnable(proto: onnx.ModelProto) -> onnx.ModelProto:
    if not proto.ir_version or proto.ir_version > MAX_ORT_IR_VERSION:
        proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    return proto


def check_raises(pipeline_text: str, model: Model, error_name: str) -> None:
    with pytest.raises(errors.IrtoolError) as info:
        PassManager(parse_pipeline(pipeline_text).build(), verify_each=True).run(model)
    if type(info.value).__name__ != error_name:
        raise GoldenMismatch(f"expected {error_name}, got {type(info.value).__name__}: {info.value}")


def check_records(records, expect: Expect, ir_before: str, ir_after: str) -> None:
    modified = any(r.modified for r in records)
    if expect.modified is not None and modified != expect.modified:
        raise GoldenMismatch(f"expected modified={expect.modified}, passes reported "
                             f"{[(r.name, r.modified, r.stats) for r in records]}")
    if not modified and ir_before != ir_after:
        raise GoldenMismatch("passes reported no change but the IR differs:\n" + _diff(ir_before, ir_after))
    for key, wanted in expect.stats.items():
        pass_name, _, stat = key.partition(".")
        # A pass may appear several times in a pipeline (cleanup runs dce twice): add its counts up.
        got = sum(int(r.stats.get(stat, 0)) for r in records if r.name == pass_name)
        if got != int(wanted):
            raise GoldenMismatch(f"stat {key}: expected {wanted}, got {got}")


def check_text(path: Path, actual: str, update: bool) -> None:
    expected = path.read_text() if path.exists() else None
    if update:
        if expected != actual:
            path.write_text(actual)
        return
    if expected is None:
        raise GoldenMismatch(f"{path.name} is missing; run pytest --update-golden and review it")
    if expected != actual:
        raise GoldenMismatch(f"printed IR differs from {path.name} (--- expected, +++ actual):\n"
                             + _diff(expected, actual))


def _diff(expected: str, actual: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                        "expected", "actual"))


# --------------------------------------------------------------------------- running and comparing
def seeded_inputs(proto: onnx.ModelProto, sample: int) -> dict[str, np.ndarray]:
    """Inputs for sample `sample`: normal floats, small ints; a bool scalar alternates per sample
    (so both branches of an If on it run)."""
    from tests.passes.helpers import random_inputs

    return random_inputs(proto, np.random.default_rng(1000 + sample), sample % 2 == 0)


def run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime without its own graph rewrites: the check is about irtool's rewrites."""
    from tests.passes.helpers import run_ort as run_unoptimized

    return run_unoptimized(proto, feeds)


def check_contract(contract: Contract, before: list[dict], after: list[dict]) -> None:
    for sample, (ref, got) in enumerate(zip(before, after, strict=True)):
        if sorted(ref) != sorted(got):
            raise GoldenMismatch(f"output names changed: {sorted(ref)} -> {sorted(got)}")
        for name in ref:
            _check_one(contract, f"sample {sample} output {name!r}", ref[name], got[name])


def _check_one(contract: Contract, where: str, ref: np.ndarray, got: np.ndarray) -> None:
    if ref.dtype != got.dtype or ref.shape != got.shape:
        raise GoldenMismatch(f"{where}: {ref.dtype}{list(ref.shape)} became {got.dtype}{list(got.shape)}")
    if contract.kind == "exact" or not np.issubdtype(ref.dtype, np.floating):
        if not np.array_equal(ref, got, equal_nan=np.issubdtype(ref.dtype, np.floating)):
            raise GoldenMismatch(f"{where}: contract exact, max abs error {_max_err(ref, got)}")
        return
    error = _max_err(ref, got)
    if not error <= contract.tolerance:
        raise GoldenMismatch(f"{where}: contract {contract.kind} {contract.tolerance}, max abs error {error}")


def _max_err(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def check_npz(path: Path, after: list[dict], update: bool) -> None:
    flat = {f"{sample}/{name}": value for sample, outs in enumerate(after) for name, value in outs.items()}
    problem = _npz_problem(path, flat)
    if update:
        # Rewrite only on a real change: npz files carry zip timestamps, so equal data would still diff.
        if problem is not None:
            np.savez(path, **flat)
        return
    if problem is not None:
        raise GoldenMismatch(problem)


def _npz_problem(path: Path, flat: dict[str, np.ndarray]) -> str | None:
    if not path.exists():
        return f"{path.name} is missing; run pytest --update-golden and review it"
    with np.load(path) as stored:
        if sorted(stored.files) != sorted(flat):
            return f"{path.name} holds {sorted(stored.files)}, the model gives {sorted(flat)}"
        for key, value in flat.items():
            if stored[key].dtype != value.dtype or stored[key].shape != value.shape:
                return f"{path.name}[{key}]: stored {stored[key].dtype}{list(stored[key].shape)}, " \
                       f"got {value.dtype}{list(value.shape)}"
            if not np.allclose(stored[key], value, rtol=NPZ_RTOL, atol=NPZ_ATOL, equal_nan=True):
                return f"{path.name}[{key}]: outputs moved, max abs error {_max_err(stored[key], value)}"
    return None
