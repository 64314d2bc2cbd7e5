"""Pass manager: analysis caching/invalidation, error wrapping, verify-each, dumps and IR printing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool import registry
from irtool.errors import InputError, PassError, VerificationError
from irtool.ir import Model
from irtool.passmanager import Analysis, Pass, PassContext, PassManager, PassResult


def small_model() -> Model:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
        helper.make_node("Neg", ["y"], ["unused"], name="dead"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return Model.from_proto(proto)


class CountingAnalysis(Analysis):
    name = "counting"
    calls = 0

    def compute(self, model, ctx):
        type(self).calls += 1
        return len(model.graph.nodes)


@dataclass
class Behaviour:
    modified: bool = False
    preserved: tuple = ()
    fail: Exception | None = None
    breaks_ir: bool = False


class Scripted(Pass):
    """A pass whose behaviour the test sets."""

    name = "scripted"
    requires = (CountingAnalysis,)
    behaviour = Behaviour()

    def run(self, model, ctx):
        b = self.behaviour
        if b.fail is not None:
            raise b.fail
        if b.breaks_ir:
            dangling = gs.Variable("ghost", dtype=np.float32, shape=[1, 3])
            model.graph.nodes.append(gs.Node("Relu", "broken", inputs=[dangling], outputs=[gs.Variable("z")]))
        return PassResult(modified=b.modified, preserved=b.preserved)


def scripted(**kwargs) -> Scripted:
    p = Scripted()
    p.behaviour = Behaviour(**kwargs)
    return p


@pytest.fixture(autouse=True)
def reset_counter():
    CountingAnalysis.calls = 0


def test_required_analysis_computed_once_and_kept_when_unmodified():
    ctx = PassContext()
    PassManager([scripted(), scripted()]).run(small_model(), ctx)
    assert CountingAnalysis.calls == 1
    assert ctx.cached(CountingAnalysis)


def test_modifying_pass_invalidates_unless_preserved():
    ctx = PassContext()
    PassManager([scripted(modified=True), scripted()]).run(small_model(), ctx)
    assert CountingAnalysis.calls == 2
    ctx2 = PassContext()
    CountingAnalysis.calls = 0
    PassManager([scripted(modified=True, preserved=("counting",)), scripted()]).run(small_model(), ctx2)
    assert CountingAnalysis.calls == 1


def test_records_hold_stats_and_timing():
    model = small_model()
    records = PassManager([scripted(), registry.get_pass("dce")()]).run(model, PassContext())
    assert [r.name for r in records] == ["scripted", "dce"]
    assert records[1].modified and records[1].stats == {"nodes_removed": 1}
    assert all(r.seconds >= 0 for r in records)
    assert [n.name for n in model.graph.nodes] == ["mm", "relu"]


def test_failure_is_wrapped_with_pass_history_and_cause():
    boom = ValueError("boom")
    dce = registry.get_pass("dce")()
    with pytest.raises(PassError) as info:
        PassManager([dce, scripted(fail=boom)]).run(small_model(), PassContext())
    assert str(info.value) == "pass 'scripted' failed after ['dce']: ValueError: boom"
    assert info.value.__cause__ is boom


def test_typed_errors_keep_their_type():
    with pytest.raises(InputError, match=r"^pass 'scripted' failed after \[\]: no calibration data$"):
        PassManager([scripted(fail=InputError("no calibration data"))]).run(small_model(), PassContext())


def test_non_result_return_is_a_pass_error():
    class Bad(Pass):
        """Returns the wrong thing."""

        name = "bad-return"

        def run(self, model, ctx):
            return True

    with pytest.raises(PassError, match="returned bool, not PassResult"):
        PassManager([Bad()]).run(small_model(), PassContext())


def test_verify_each_names_the_breaking_pass():
    with pytest.raises(VerificationError) as info:
        PassManager([registry.get_pass("dce")(), scripted(modified=True, breaks_ir=True)],
                    verify_each=True).run(small_model(), PassContext())
    message = str(info.value)
    assert message.startswith("verification failed after pass 'scripted' (after ['dce'])")
    assert "'ghost', which nothing defines" in message


def test_dump_dir_and_print_ir_after(tmp_path):
    printed: list[str] = []
    PassManager([registry.get_pass("dce")(), scripted()], dump_dir=tmp_path / "dumps",
                print_ir_after=["dce"], ir_printer=printed.append).run(small_model(), PassContext())
    dumped = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert dumped == ["001_dce.onnx", "002_scripted.onnx"]
    reloaded = onnx.load(str(tmp_path / "dumps" / "001_dce.onnx"))
    assert [n.name for n in reloaded.graph.node] == ["mm", "relu"]
    assert len(printed) == 1 and printed[0].startswith("// IR after dce\n")
    assert "= Relu[relu](%y)" in printed[0] and "dead" not in printed[0]


def test_register_pass_rejects_non_kebab_names():
    class Wrong(Pass):
        """Bad name."""

        name = "Wrong_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        registry.register_pass(Wrong)
