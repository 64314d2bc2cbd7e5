"""Pruning oracle: the pruned model equals the original with the removed channels masked out
(consumer input-channel weights zeroed), on CNNs with residual adds, concats, depthwise convs and
flatten -> gemm, exported from torch."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from irtool.analysis.channels import ChannelGroups
from irtool.ir import Model
from irtool.ir.verify import verify
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.relu(x + self.pw(torch.relu(self.dw(torch.relu(self.bn1(self.conv1(x)))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = Block(16)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 12, 3, padding=1)
        self.fuse = nn.Conv2d(20, 16, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        x = torch.cat([torch.relu(self.left(x)), torch.sigmoid(self.right(x))], dim=1)
        x = nn.functional.max_pool2d(torch.relu(self.fuse(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def export(module: nn.Module, shape=(2, 3, 8, 8), dynamo: bool = False) -> onnx.ModelProto:
    """Export with fixed random weights; legacy (TorchScript) or dynamo exporter."""
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    module.eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.randn(*shape),), buffer, dynamo=dynamo, input_names=["x"],
                      output_names=["y"], opset_version=18 if dynamo else 17)
    return onnx.load_from_string(buffer.getvalue())


_EXPORTS: dict[bool, onnx.ModelProto] = {}


def net_proto(dynamo: bool = False) -> onnx.ModelProto:
    if dynamo not in _EXPORTS:  # the dynamo exporter takes seconds; export once per session
        _EXPORTS[dynamo] = export(Net(), dynamo=dynamo)
    return _EXPORTS[dynamo]


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def masked(proto: onnx.ModelProto, removed: dict[str, list[int]]) -> onnx.ModelProto:
    """Zero the input-channel weights of removed channels in every weighted consumer (the oracle)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type in ("LSTM", "GRU", "RNN"):
            _mask_recurrent(node, inits, removed)
            continue
        if not node.input or node.input[0] not in removed or len(node.input) < 2 or node.input[1] not in inits:
            continue
        idx = removed[node.input[0]]
        w = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":  # input channel i of a grouped conv is read by the outputs of group i // K_in
            k_in, per_group = w.shape[1], w.shape[0] // attrs.get("group", 1)
            for i in idx:
                w[i // k_in * per_group:(i // k_in + 1) * per_group, i % k_in] = 0
        elif node.op_type == "ConvTranspose" and attrs.get("group", 1) == 1:
            w[idx] = 0
        elif node.op_type == "Gemm":
            if attrs.get("transB", 0):
                w[:, idx] = 0
            else:
                w[idx, :] = 0
        elif node.op_type == "MatMul":
            w[idx, :] = 0
        else:
            continue
        inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(w, node.input[1]))
    return out


def _mask_recurrent(node: onnx.NodeProto, inits: dict, removed: dict[str, list[int]]) -> None:
    """A recurrent layer reads removed input channels through W [D, G·H, I] and its own removed hidden units
    through R [D, G·H, H] (the recurrence): zero those columns."""
    hidden = removed.get(next(name for name in node.output if name), [])
    for index, gone in ((1, removed.get(node.input[0], [])), (2, hidden)):
        if len(gone):
            w = onnx.numpy_helper.to_array(inits[node.input[index]]).copy()
            w[:, :, gone] = 0
            inits[node.input[index]].CopyFrom(onnx.numpy_helper.from_array(w, node.input[index]))


def prune(proto: onnx.ModelProto, text: str, seed: int = 0):
    model = Model.from_proto(proto)
    ctx = PassContext(seed=seed)
    passes = parse_pipeline(text).build()
    graph = ctx.analysis(ChannelGroups, model)
    plan = passes[0].plan(model, ctx)
    removed = plan.removed_indices(graph)
    records = PassManager(passes, verify_each=True).run(model, ctx)
    return model, removed, records


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("text", ["prune{ratio=0.5}", "prune{ratio=0.3,importance=l1}",
                                  "prune{ratio=0.5,round-to=4}", "prune{ratio=0.6,importance=random}"])
def test_pruned_model_equals_masked_original(text, dynamo):
    original = net_proto(dynamo)
    model, removed, records = prune(original, text)
    assert records[0].modified and records[0].stats["channels_removed"] > 0
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    pruned_out = run(model.to_proto(), x)
    oracle_out = run(masked(original, removed), x)
    assert pruned_out.shape == (2, 10)
    np.testing.assert_allclose(pruned_out, oracle_out, rtol=1e-4, atol=1e-4)
    # The oracle is not vacuous: masking really changes the original's outputs.
    assert np.abs(run(original, x) - oracle_out).max() > 1e-3


def test_weights_physically_shrink_and_groups_are_coupled():
    original = net_proto()
    model, removed, _ = prune(original, "prune{ratio=0.5}")
    weights = {t.name: t for t in model.to_proto().graph.initializer}
    shapes = {n.name: [list(weights[i].dims) for i in n.input if i in weights] for n in model.to_proto().graph.node}
    # Residual stream (stem, block.pw and the add) loses one group of 16 -> 8 channels together.
    stem = next(v for k, v in shapes.items() if "stem" in k)
    dw = next(v for k, v in shapes.items() if "dw" in k)
    pw = next(v for k, v in shapes.items() if "pw" in k)
    assert stem[0][0] == 8 and pw[0][0] == 8
    assert dw[0] == [8, 1, 3, 3]  # depthwise shrinks with its input, group follows
    dw_node = next(n for n in model.graph.nodes if "dw" in n.name)
    assert dw_node.attrs["group"] == 8
    fc1 = next(v for k, v in shapes.items() if "fc1" in k)
    fuse = next(v for k, v in shapes.items() if "fuse" in k)
    assert fc1[0][1] == fuse[0][0] * 16  # flatten: each removed channel takes its 4x4 block
    assert fc1[0][0] == 16  # 32 hidden -> 16
    verify(model)


def test_graph_output_group_is_locked_and_reported():
    model = Model.from_proto(net_proto())
    graph = PassContext().analysis(ChannelGroups, model)
    locked = [g for g in graph.groups if g.locked]
    assert any("graph output" in g.locked for g in locked)
    out_group = next(g for g in graph.groups if "y" in g.key)
    assert out_group.size == 10 and "graph output" in out_group.locked


def test_exclude_keeps_matching_layers():
    _, removed, _ = prune(net_proto(), "prune{ratio=0.5,exclude=['fc1']}")
    fc1_out = [name for name in removed if "fc1" in name]
    assert not fc1_out


def test_same_seed_same_bytes():
    a, _, _ = prune(net_proto(), "prune{ratio=0.5,importance=random}", seed=3)
    b, _, _ = prune(net_proto(), "prune{ratio=0.5,importance=random}", seed=3)
    assert a.to_proto().SerializeToString(deterministic=True) == b.to_proto().SerializeToString(deterministic=True)


class PickedStep(nn.Module):
    """A sequence net read at one step on another axis than the channels: the last step of a Conv1d stack
    (y[:, :, -1]) and the class token of a token MLP (h[:, 0]); both export to a Gather."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(6, 24, 3, padding=1), nn.Conv1d(24, 24, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(24, 32), nn.Linear(32, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = torch.relu(self.fc2(torch.relu(self.fc1(y.transpose(1, 2)))))
        return self.head(h[:, 0] + y[:, :, -1])


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_gather_on_another_axis_passes_the_channels_through(dynamo):
    """c2's and fc2's channels meet in an add after a Gather each; without a Gather handler they were locked
    ("read by Gather ..., which has no channel handler")."""
    original = export(PickedStep(), shape=(2, 6, 10), dynamo=dynamo)
    graph = PassContext().analysis(ChannelGroups, Model.from_proto(original))
    assert sorted(g.size for g in graph.groups if g.locked is None) == [24, 24, 32]
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 40
    x = np.random.default_rng(1).standard_normal((2, 6, 10)).astype(np.float32)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)
    assert np.abs(run(original, x) - run(masked(original, removed), x)).max() > 1e-3


def twin_convs() -> onnx.ModelProto:
    """Two branches Conv(bias) -> Relu -> Conv, added; both biases zero, and one of them also a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    zeros = [numpy_helper.from_array(np.zeros(8, np.float32), name) for name in ("ba", "bb")]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["ra", "wa2"], ["ya"], name="conv_a2"),
             helper.make_node("Conv", ["rb", "wb2"], ["yb"], name="conv_b2"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
                               helper.make_tensor_value_info("bb", TensorProto.FLOAT, [8])],
                              [weight("wa", 8, 3, 3, 3), weight("wb", 8, 3, 3, 3), *zeros,
                               weight("wa2", 4, 8, 1, 1), weight("wb2", 4, 8, 1, 1)])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)


def test_a_bias_shared_by_two_convs_or_output_by_the_graph_is_sliced_for_one_conv_only():
    """dedup-initializers merges the two zero biases into one; slicing it for the first conv crashed the
    second ("index 6 is out of bounds"), and a bias that is also a graph output came out sliced."""
    model = Model.from_proto(twin_convs())
    PassManager(parse_pipeline("cleanup").build()).run(model, PassContext())
    cleaned = model.to_proto()
    readers = [n.name for n in cleaned.graph.node if len(n.input) > 2 and n.input[2] == "ba"]
    assert sorted(readers) == ["conv_a", "conv_b"]  # the premise: one bias tensor for both convs
    model, removed, records = prune(cleaned, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 8
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    got, bias = session.run(None, {"x": x})
    np.testing.assert_allclose(got, run(masked(cleaned, removed), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bias, np.zeros(8, np.float32))


def test_a_batch_norm_whose_scale_and_variance_are_one_constant_is_pruned():
    """An untrained BatchNorm's scale and running variance are both ones, and torch.export stores them as one
    constant: the layer used to be locked ("non-constant parameters")."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    params = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              (("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3), ("w2", rng.standard_normal((4, 16, 1, 1)) * 0.3),
               ("ones", np.ones(16)), ("shift", rng.standard_normal(16) * 0.1), ("mean", rng.standard_normal(16)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "ones", "shift", "mean", "ones"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], params)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 8
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    assert [np.asarray(t.values).shape for t in bn.inputs[1:]] == [(8,)] * 4
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)
