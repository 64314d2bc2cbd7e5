"""Models below opset 13 load upgraded (irtool.ir.io.upgrade_opset): same outputs, the caller's proto untouched."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from irtool.errors import InputError
from irtool.ir import io as ir_io
from irtool.ir.model import Model

F32 = TensorProto.FLOAT


class OldForms(nn.Module):
    """Ops whose ONNX form changed between opset 9 and 13: Upsample (-> Resize), chunk (Split's `split`
    attribute -> input), squeeze / unsqueeze and mean (`axes` attribute -> input), Slice's attributes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a, b = torch.chunk(torch.relu(self.conv(x)), 2, dim=1)
        z = self.conv2(a * torch.sigmoid(b))
        z = F.interpolate(F.max_pool2d(z, 2), scale_factor=2.0, mode="nearest")
        s = torch.softmax(z.flatten(2), dim=1)
        m = s.mean(dim=2, keepdim=True).squeeze(2).unsqueeze(1)
        return self.fc(m.flatten(1))


def export(opset: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(OldForms().eval(), (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], opset_version=opset, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buffer.getvalue())


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def old_attribute_forms(proto: onnx.ModelProto) -> list[str]:
    """Nodes anywhere in the model still written in a pre-13 form."""
    moved = {"Squeeze": "axes", "Unsqueeze": "axes", "ReduceSum": "axes", "Split": "split", "Slice": "starts"}
    found, graphs = [], [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            names = {a.name for a in node.attribute}
            if moved.get(node.op_type) in names or node.op_type == "Upsample":
                found.append(f"{node.op_type} {node.name}")
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return found


@pytest.mark.parametrize("opset", [9, 10, 11, 12])
def test_torch_export_at_an_old_opset_loads_with_the_same_outputs(tmp_path, opset):
    proto = export(opset)
    onnx.save(proto, tmp_path / "old.onnx")
    before = (tmp_path / "old.onnx").read_bytes()
    model = Model.load(tmp_path / "old.onnx")
    upgraded = model.to_proto()
    assert (model.source_opset, model.opset) == (opset, 13)
    assert upgraded.ir_version >= 7 and old_attribute_forms(upgraded) == []
    assert old_attribute_forms(proto) != []  # the export did use the old forms
    x = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(upgraded, x)[0], run(proto, x)[0])
    assert (tmp_path / "old.onnx").read_bytes() == before


def _squeeze_branch(name: str) -> onnx.GraphProto:
    node = helper.make_node("Squeeze", ["x"], [f"{name}_y"], axes=[0], name=f"{name}_squeeze")
    return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", F32, [5])])


def opset11_with_subgraphs() -> onnx.ModelProto:
    """Softmax on axis 1 of a 3-D tensor (flattening semantics before 13), attribute forms in an If's
    branches, and a weight large enough to be held out of the converter."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Softmax", ["a"], ["s"], axis=1, name="softmax"),
        helper.make_node("ReduceSum", ["s"], ["r"], axes=[2], keepdims=1, name="reduce"),
        helper.make_node("Split", ["a"], ["p", "q"], axis=2, split=[1, 3], name="split"),
        helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"),
        helper.make_node("If", ["c"], ["z"], then_branch=_squeeze_branch("then"),
                         else_branch=_squeeze_branch("else"), name="if"),
    ]
    outputs = [("s", [2, 3, 4]), ("r", [2, 3, 1]), ("p", [2, 3, 1]), ("q", [2, 3, 3]), ("m", [2, 3, 256]), ("z", [5])]
    inputs = [helper.make_tensor_value_info("a", F32, [2, 3, 4]), helper.make_tensor_value_info("x", F32, [1, 5]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(n, F32, s) for n, s in outputs],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


@pytest.mark.parametrize("branch", [True, False])
def test_softmax_semantics_and_if_branches_are_upgraded(branch):
    proto = opset11_with_subgraphs()
    before = proto.SerializeToString()
    model = Model.from_proto(proto)
    upgraded = model.to_proto()
    assert proto.SerializeToString() == before  # held-out weights went back into the caller's proto
    assert model.source_opset == 11 and old_attribute_forms(upgraded) == []
    feeds = {"a": np.random.default_rng(2).random((2, 3, 4), np.float32), "x": np.arange(5, dtype=np.float32)[None],
             "c": np.array(branch)}
    for got, want in zip(run(upgraded, feeds), run(proto, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_opset7_ir3_model_with_initializers_as_inputs():
    """IR version 3 lists every initializer among the graph inputs; after the upgrade they are constants."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (16, 3, 3, 3)), ("scale", (16,)), ("bias", (16,)), ("mean", (16,)), ("var", (16,))]]
    inits[-1] = numpy_helper.from_array(np.abs(numpy_helper.to_array(inits[-1])) + 0.5, "var")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    inputs = [helper.make_tensor_value_info("x", F32, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, F32, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F32, [1, 16, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    model = Model.from_proto(proto)
    upgraded = model.to_proto()
    assert [i.name for i in upgraded.graph.input] == ["x"] and upgraded.ir_version >= 7
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(upgraded, x)[0], run(proto, x)[0])


def test_a_model_the_converter_cannot_upgrade_is_one_clear_error():
    """An Erf declared at opset 8 (it appeared in 9): the converter has no adapter, the caller's proto stays."""
    weight = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["s"], name="add"), helper.make_node("Erf", ["s"], ["y"], name="erf")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [512])],
                              [helper.make_tensor_value_info("y", F32, [512])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=4)
    before = proto.SerializeToString()
    with pytest.raises(InputError, match=r"^m\.onnx: opset 8 could not be upgraded to 13 by onnx\.version_converter "
                                         r"\(No Adapter From Version \$8 for Erf\)$"):
        Model.from_proto(proto, source="m.onnx")
    assert proto.SerializeToString() == before


def test_upgrade_keeps_weights_bit_exact_and_other_domains():
    proto = opset11_with_subgraphs()
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    converted = ir_io.upgrade_opset(proto, "<model>")
    assert {(o.domain, o.version) for o in converted.opset_import} == {("", 13), ("com.microsoft", 1)}
    weights = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    np.testing.assert_array_equal(weights["w"], numpy_helper.to_array(proto.graph.initializer[0]))
    assert not any(t.external_data for t in converted.graph.initializer)


def test_quant_from_the_command_line_on_an_opset11_export(tmp_path):
    """`irtool opt old.onnx --passes quant` gives a model as accurate as quantizing the opset-17 export of the
    same module does, says so in the report, and leaves the input file as it was. Not bit for bit: the opset-11
    softmax over dim 1 is exported between two Transposes, so the mean after it is not a GlobalAveragePool there,
    runs in float, and nothing integer reads what feeds it (placement rule 9: no Q/DQ); measured 65.6 dB against
    64.5 for the opset-17 export's."""
    from tests.cli.conftest import run_cli, sha256

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    outputs = {}
    for opset in (11, 17):
        model, out, report = (tmp_path / f"{opset}{suffix}" for suffix in (".onnx", ".q.onnx", ".json"))
        onnx.save(export(opset), model)
        before = sha256(model)
        result = run_cli("opt", model, "-o", out, "--passes", "quant", "--calib-data", tmp_path / "calib.npz",
                         "--report", report)
        assert result.returncode == 0, result.stderr
        assert sha256(model) == before
        assert json.loads(report.read_text())["opset"] == {"input": opset, "output": max(opset, 13)}
        upgraded = "opset: 11 -> 13 (upgraded on load)" in result.stdout
        assert upgraded == (opset == 11) and ("opset 11 upgraded to 13 on load" in result.stderr) == upgraded
        inspected = json.loads(run_cli("inspect", model, "--json").stdout)
        assert (inspected["opset"], inspected["analysed_opset"]) == (opset, max(opset, 13))
        quantized = onnx.load(out)
        assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 3
        x = {"x": np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32)}
        outputs[opset] = run(quantized, x)[0], run(export(opset), x)[0]
    (q11, float11), (q17, float17) = outputs[11], outputs[17]
    np.testing.assert_array_equal(float11, float17)
    sqnr11, sqnr17 = (10 * np.log10(np.sum(float17 ** 2) / np.sum((q - float17) ** 2)) for q in (q11, q17))
    assert min(sqnr11, sqnr17) > 25 and abs(sqnr11 - sqnr17) < 3, (sqnr11, sqnr17)
