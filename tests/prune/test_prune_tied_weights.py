"""prune with weights that several nodes read: a block applied several times (iterative refinement, RAFT's update
step unrolled by the export) and an nn.RNN, which torch.export unrolls into per-step MatMuls sharing W_hh. The
readers' channels are tied and the weight is sliced once, so it stays shared. Before, a shared weight locked its
readers: the refinement net lost nothing, the dynamo RNN only its front end (16 channels, 40 from the RNN op)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from irtool.api import optimize
from irtool.frontends.torch import export_module
from tests.prune.test_prune_archs import analysis
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


class Refine(torch.nn.Module):
    """A stem, then one conv block and one per-pixel linear layer applied three times, then a 2-channel head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.update = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.mix = torch.nn.Linear(32, 32)
        self.head = torch.nn.Conv2d(32, 2, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for _ in range(3):
            h = h + torch.relu(self.update(h))
            h = h + self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(h)


class Elman(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.front = torch.nn.Conv1d(10, 32, 3, padding=1)
        self.rnn = torch.nn.RNN(32, 48, batch_first=True)
        self.fc = torch.nn.Linear(48, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.front(x)).transpose(1, 2))
        return self.fc(y[:, -1])


def _pruned(module: torch.nn.Module, shape: tuple[int, ...], exporter: str):
    torch.manual_seed(0)
    proto = export_module(module.eval(), {"x": torch.randn(*shape)}, exporter=exporter, dynamic_batch=False)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5,round-to=1}")
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)
    return model.to_proto(), records[0].stats["channels_removed"]


def _readers(proto: onnx.ModelProto) -> dict[str, int]:
    """Initializers read by several nodes, with their reader counts."""
    uses = collections.Counter(name for node in proto.graph.node for name in node.input)
    return {t.name: uses[t.name] for t in proto.graph.initializer if uses[t.name] > 1}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_block_applied_three_times_is_pruned_and_keeps_one_weight(exporter):
    torch.manual_seed(0)
    model, removed = _pruned(Refine(), (2, 3, 8, 8), exporter)
    assert removed == 16
    shared = {name: n for name, n in _readers(model).items() if n == 3}
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name in shared}
    assert (16, 16, 3, 3) in weights.values() and (16,) in weights.values()  # the conv's, and the linear bias
    assert any(dims in ((16, 16),) for dims in weights.values())  # the linear layer's weight, still one tensor


def test_an_rnn_unrolled_by_torch_export_prunes_like_the_rnn_op():
    torch.manual_seed(0)
    _, scripted = _pruned(Elman(), (2, 10, 6), "torchscript")  # one RNN node
    torch.manual_seed(0)
    model, unrolled = _pruned(Elman(), (2, 10, 6), "dynamo")  # per-step MatMuls sharing W_hh
    assert scripted == unrolled == 16 + 24
    assert any(n >= 5 for n in _readers(model).values())  # W_hh: one [24, 24] weight for every step


def test_a_shared_weight_whose_readers_disagree_is_locked():
    """One reader of the shared weight reads a graph input (no channels to remove): its input side locks the
    other reader's input, whose channels would otherwise go from the weight's rows under the first."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["b"], name="second"),
             helper.make_node("MatMul", ["b", "out_w"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [w, numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "out_w")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # a and b are tied (the weight's columns); r is a's relu, so it is tied to second's input, which follows
    # first's input x: no channels there, so that side locks, and with it a, r and b
    groups = analysis(original).groups
    assert [(g.size, g.locked) for g in groups if g.size == 8] == [
        (8, "'w' is shared by 2 nodes and one of them cannot follow its channels")]
    assert prune(original, "prune{ratio=0.5,round-to=1}")[2][0].stats["channels_removed"] == 0


def test_a_shared_bias_that_one_reader_adds_to_a_tensor_without_channels_is_copied():
    """`b` is added to a conv output and to the graph input x, whose Add has no channels to follow: the first Add
    slices a copy of `b`, and the second keeps the whole of it. (Until session 25 this locked the first Add.)"""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 8, 1, 1)), ("b", (1, 8, 1, 1)), ("w2", (3, 8, 1, 1)), ("w3", (3, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="c1"),
             helper.make_node("Add", ["c", "b"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y1"], name="c2"),
             helper.make_node("Add", ["x", "b"], ["a2"], name="add2"),
             helper.make_node("Conv", ["a2", "w3"], ["y2"], name="c3")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 4, 4]) for n in ("y1", "y2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              outputs, inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [g.locked for g in analysis(original).groups if g.size == 8] == [None]
    model, removed, _ = prune(original, "prune{ratio=0.5,round-to=1}")
    biases = sorted(np.asarray(n.inputs[1].values).shape[1] for n in model.graph.nodes if n.op == "Add")
    assert biases == [4, 8] and len(removed["a1"]) == 4  # add1's copy lost half, add2's b is whole
    x = np.random.default_rng(1).standard_normal((1, 8, 4, 4)).astype(np.float32)
    outputs, oracle = (ort.InferenceSession(p.SerializeToString()).run(None, {"x": x})
                       for p in (model.to_proto(), masked(original, removed)))
    for out, ref in zip(outputs, oracle, strict=True):  # y1 through the pruned channels, y2 through the whole b
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
