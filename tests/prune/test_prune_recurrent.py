"""prune through LSTM, GRU and RNN layers: a hidden unit is one filter (its rows of every gate and direction), the
recurrence reads it through R's column, and the layer's input channels are W's columns. Oracle: the original model
with the removed input channels and hidden units masked (test_prune_masking.masked zeroes W's and R's columns)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from torch import nn

from irtool.analysis.cost import model_cost
from irtool.ir import Model
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline
from tests.prune.test_prune_masking import export, masked, prune

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Speech(nn.Module):
    """Keyword spotting: Conv1d features -> recurrent layers -> a classifier on the last step."""

    def __init__(self, kind: str = "lstm", bidirectional: bool = False, layers: int = 1, state: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(10, 32, 3, padding=1)
        self.rnn = RNNS[kind](32, 48, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(48 * (2 if bidirectional else 1), 12)
        self.state = state

    def forward(self, x, *state):
        h = torch.relu(self.conv(x)).transpose(1, 2)
        y, _ = self.rnn(h, state[0] if len(state) == 1 else tuple(state) or None) if self.state else self.rnn(h)
        return self.fc(y[:, -1])


def exported(module: nn.Module, dynamo: bool, state_shapes: tuple = ()) -> onnx.ModelProto:
    """The export, with the dynamo exporter's gate reordering (Slice/Concat of the weights) folded by cleanup."""
    if state_shapes:
        torch.manual_seed(0)
        for p in module.parameters():
            nn.init.normal_(p, std=0.3)
        module.eval()
        args = (torch.randn(2, 10, 16), *(torch.randn(*s) for s in state_shapes))
        names = ["x"] + [f"s{i}" for i in range(len(state_shapes))]
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=dynamo, input_names=names, output_names=["y"],
                          opset_version=18 if dynamo else 17)
        proto = onnx.load_from_string(buffer.getvalue())
    else:
        proto = export(module, shape=(2, 10, 16), dynamo=dynamo)
    model = Model.from_proto(proto)
    PassManager(parse_pipeline("cleanup").build()).run(model, PassContext())
    return model.to_proto()


def feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in proto.graph.input}


def run(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def recurrent(model: Model) -> list[gs.Node]:
    return [n for n in model.graph.nodes if n.op in ("LSTM", "GRU", "RNN")]


# torch.export unrolls nn.RNN into one MatMul per step, all reading one shared R: prune leaves shared weights
# alone, so that export is not a case here.
CASES = [pytest.param(kind, bi, layers, dynamo, id=f"{kind}{'-bi' if bi else ''}-{layers}-{exporter}")
         for kind, bi, layers in [("lstm", False, 1), ("gru", True, 2), ("rnn", False, 2), ("lstm", True, 1)]
         for exporter, dynamo in (("legacy", False), ("dynamo", True)) if not (kind == "rnn" and dynamo)]


@pytest.mark.parametrize(("kind", "bidirectional", "layers", "dynamo"), CASES)
def test_recurrent_layers_lose_hidden_units_and_equal_the_masked_original(kind, bidirectional, layers, dynamo):
    original = exported(Speech(kind, bidirectional, layers), dynamo)
    model, removed, records = prune(original, "prune{ratio=0.5}")
    layers_after = recurrent(model)
    assert len(layers_after) == layers and all(n.attrs["hidden_size"] == 24 for n in layers_after)
    gates, directions = {"lstm": 4, "gru": 3, "rnn": 1}[kind], 2 if bidirectional else 1
    first = layers_after[0]
    assert np.asarray(first.inputs[1].values).shape == (directions, gates * 24, 16)  # conv: 32 -> 16
    assert np.asarray(first.inputs[2].values).shape == (directions, gates * 24, 24)
    inputs = feeds(original)
    oracle = masked(original, removed)
    np.testing.assert_allclose(run(model.to_proto(), inputs), run(oracle, inputs), rtol=1e-4, atol=1e-5)
    assert np.abs(run(original, inputs) - run(oracle, inputs)).max() > 1e-3  # the oracle is not vacuous
    before, after = model_cost(Model.from_proto(original)), model_cost(model)
    assert not after.unsupported_ops and 1 - after.total_macs / before.total_macs > 0.7  # R shrinks on both sides


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_an_initial_state_from_the_graph_inputs_keeps_its_shape_and_is_gathered(dynamo):
    original = exported(Speech("lstm", state=True), dynamo, state_shapes=((1, 2, 48), (1, 2, 48)))
    model, removed, _ = prune(original, "prune{ratio=0.5}")
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.to_proto().graph.input] == \
        [[2, 10, 16], [1, 2, 48], [1, 2, 48]]
    lstm = recurrent(model)[0]
    assert lstm.attrs["hidden_size"] == 24 and all(lstm.inputs[i].inputs[0].op == "Gather" for i in (5, 6))
    inputs = feeds(original)
    np.testing.assert_allclose(run(model.to_proto(), inputs), run(masked(original, removed), inputs),
                               rtol=1e-4, atol=1e-5)


def test_a_final_state_that_is_a_graph_output_locks_the_units():
    class WithState(Speech):
        def forward(self, x):
            y, (h, _) = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
            return self.fc(y[:, -1]), h

    model, _, records = prune(exported(WithState("lstm"), False), "prune{ratio=0.5}")
    assert recurrent(model)[0].attrs["hidden_size"] == 48
    assert [g["producers"] for g in records[0].stats["groups"]] == [["/conv/Conv"]]
