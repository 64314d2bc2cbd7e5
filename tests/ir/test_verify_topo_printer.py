"""Verifier problems, the iterative toposort, If/Loop models end to end, and the textual printer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from irtool.errors import VerificationError
from irtool.ir import Model
from irtool.ir.printer import format_model
from irtool.ir.topo import topo_order
from irtool.ir.verify import structural_problems, verify
from tests.ir.helpers import add_proto, conv_proto, if_proto, loop_proto, relu_chain


# ----------------------------------------------------------------------------------------- verifier
def test_sound_model_has_no_problems():
    model = Model(relu_chain(3))
    assert structural_problems(model) == []
    verify(model)


def test_duplicate_node_names():
    graph = relu_chain(3)
    model = Model(graph)
    graph.nodes[1].name = "n0"
    assert structural_problems(model) == ["node name 'n0' is used twice"]
    with pytest.raises(VerificationError, match="node name 'n0' is used twice"):
        verify(model)


def test_two_producers_of_one_value():
    graph = relu_chain(3)
    model = Model(graph)
    graph.nodes[1].outputs = [graph.nodes[0].outputs[0]]
    problems = structural_problems(model)
    assert "value 'v0' has two producers: 'n0' and 'n1'" in problems


def test_out_of_order_nodes_reported_without_sorting():
    graph = relu_chain(3)
    model = Model(graph)
    graph.nodes = graph.nodes[::-1]   # skip to_proto, which would sort
    assert structural_problems(model) == [
        "node 'n2' uses 'v1' before it is produced (not in topological order)",
        "node 'n1' uses 'v0' before it is produced (not in topological order)",
    ]


def test_dangling_input():
    graph = relu_chain(3)
    model = Model(graph)
    graph.nodes[1].inputs = [gs.Variable("ghost", np.float32, [4])]
    assert structural_problems(model) == ["node 'n1' uses 'ghost', which nothing defines"]


def test_undefined_graph_output():
    graph = relu_chain(2)
    model = Model(graph)
    graph.outputs.append(gs.Variable("nowhere", np.float32, [4]))
    assert structural_problems(model) == ["graph output 'nowhere' is not defined"]


def test_bad_large_tensor_byte_count():
    proto = add_proto(2048)
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    model = Model.from_proto(proto)
    with pytest.raises(VerificationError, match=r"initializer 'w' has 8188 bytes, dims \[2048\] need 8192"):
        verify(model, proto)


def test_onnx_checker_problems_are_verification_errors():
    proto = conv_proto()
    proto.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(VerificationError, match="onnx rejects the model"):
        verify(Model.from_proto(proto))


# ----------------------------------------------------------------------------------------- toposort
def test_iterative_toposort_of_a_long_reversed_chain():
    graph = relu_chain(5000)
    graph.nodes = graph.nodes[::-1]
    model = Model(graph)
    assert topo_order(graph.nodes)[:3] == [4999, 4998, 4997]
    proto = model.to_proto()
    assert [n.name for n in proto.graph.node[:3]] == ["n0", "n1", "n2"]
    assert [n.name for n in proto.graph.node] == [f"n{i}" for i in range(5000)]


def test_graphsurgeon_toposort_recurses_on_the_same_chain():
    # Why the core has its own sort (DESIGN.md, Traps).
    graph = relu_chain(5000)
    graph.nodes = graph.nodes[::-1]
    with pytest.raises(RecursionError):
        graph.toposort()


def test_toposort_is_stable_for_sorted_graphs():
    graph = relu_chain(4)
    assert topo_order(graph.nodes) == [0, 1, 2, 3]


def test_cycle_is_a_verification_error():
    graph = relu_chain(2)
    graph.nodes[0].inputs = [graph.nodes[1].outputs[0]]
    with pytest.raises(VerificationError, match="cycle"):
        topo_order(graph.nodes)


# ----------------------------------------------------------------------------------------- subgraphs
@pytest.mark.parametrize("make, feeds, expected", [
    (if_proto, {"x": np.array([1, 2], np.float32), "c": np.array(True)}, [2, 4]),
    (if_proto, {"x": np.array([1, 2], np.float32), "c": np.array(False)}, [1, 4]),
    (loop_proto, {"x": np.array([1, 2], np.float32)}, [4, 8]),
])
def test_control_flow_models_load_print_verify_save(tmp_path, make, feeds, expected):
    onnx.save(make(), tmp_path / "in.onnx")
    model = Model.load(tmp_path / "in.onnx")
    verify(model)
    text = format_model(model)
    assert ("then_branch:" in text and "else_branch:" in text) or "body:" in text
    model.save(tmp_path / "out.onnx")
    reloaded = Model.load(tmp_path / "out.onnx")
    assert [n.name for n in reloaded.nodes()] == [n.name for n in model.nodes()]
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], expected)


def test_loop_printout():
    assert format_model(Model.from_proto(loop_proto())).splitlines() == [
        "opset 17",
        "graph main (%x: f32[2]) -> (%acc: f32[2])",
        "  @trip = i64[] [3]",
        "  %acc : f32[2] = Loop[loop](@trip, _, %x)",
        "    body:",
        "      graph body (%i: i64[], %cond_in: bool[], %acc_in: f32[2]) -> (%cond_out: bool[], %acc_out: f32[2])",
        "        %cond_out : bool[] = Identity[body_id](%cond_in)",
        "        %acc_out : f32[2] = Add[body_add](%acc_in, %x)",
    ]


# ----------------------------------------------------------------------------------------- printer
def test_printer_small_conv_model():
    text = format_model(Model.from_proto(conv_proto()))
    weight_crc = "#18527e79"   # CRC32 of arange(108) float32 bytes: any weight change shows in a diff
    assert text.splitlines() == [
        "opset 17",
        "graph net (%x: f32[1,3,8,8]) -> (%y: f32[1,4,8,8])",
        f"  @w = f32[4,3,3,3] {weight_crc}",
        "  @b = f32[4] [ 0.5,-1. , 2. , 0. ]",
        "  %c : f32[1,4,8,8] = Conv[conv](%x, @w, @b) {kernel_shape=[3,3], pads=[1,1,1,1]}",
        "  %y : f32[1,4,8,8] = Relu[relu](%c)",
    ]
    assert text.endswith("\n")


def test_printer_uses_input_shapes_for_symbolic_dims():
    proto = conv_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model = Model.from_proto(proto)
    assert "(%x: f32[N,3,8,8]) -> (%y: f32[N,4,8,8])" in format_model(model)
    assert "(%x: f32[2,3,8,8]) -> (%y: f32[2,4,8,8])" in format_model(model, {"x": [2, 3, 8, 8]})
