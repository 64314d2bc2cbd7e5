"""prune's channel rounding: round-to=auto aligns what a Conv reads so ONNX Runtime keeps its blocked (NCHWc)
kernels, round-to=N counts channels (not heads), and MAC targets are still met with coarse rounding."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from torch import nn

from irtool.analysis.cost import model_cost
from irtool.ir import Model
from tests.prune.test_prune_archs import _shape_constants, prepared
from tests.prune.test_prune_masking import export, masked, net_proto, prune, run


class Wide(nn.Module):
    """64-channel convs (plain, depthwise, pointwise) feeding a 48-channel layer that only a Gemm reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pw = nn.Conv2d(64, 48, 1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.fc(torch.relu(self.pw(x)).mean((2, 3)))


_WIDE: list[onnx.ModelProto] = []


def wide() -> onnx.ModelProto:
    if not _WIDE:
        _WIDE.append(export(Wide(), shape=(2, 3, 16, 16)))
    return _WIDE[0]


def conv_input_channels(model: Model) -> list[int]:
    return [int(np.asarray(n.inputs[1].values).shape[1] * n.attrs.get("group", 1))
            for n in model.graph.nodes if n.op == "Conv"]


def blocked_convs(proto: onnx.ModelProto) -> int:
    """Convs ONNX Runtime's CPU provider runs in its NCHWc layout, read from the graph it optimizes."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return sum(1 for n in optimized.graph.node if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv")


def test_auto_rounding_aligns_conv_inputs_and_onnx_runtime_runs_them_blocked():
    original = wide()
    aligned, removed, _ = prune(original, "prune{ratio=0.3}")
    plain, _, _ = prune(original, "prune{ratio=0.3,round-to=1}")
    # 64 channels at ratio 0.3 keep 45; auto rounds the ones a Conv reads up to 48
    assert conv_input_channels(plain) == [3, 45, 45, 45]
    assert conv_input_channels(aligned) == [3, 48, 48, 48]
    # pw's 48 outputs only reach a Gemm (through ReduceMean): 34 kept, not rounded
    assert [np.asarray(n.inputs[1].values).shape for n in aligned.graph.nodes if n.op == "Gemm"] == [(10, 34)]
    assert blocked_convs(aligned.to_proto()) == 4
    assert blocked_convs(plain.to_proto()) == 1  # the stem: 3 inputs (its 45 outputs do not matter)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run(aligned.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


def test_auto_rounding_leaves_narrow_layers_exact():
    auto, _, _ = prune(net_proto(), "prune{ratio=0.2}")  # 16-channel layers: 13 kept, not 16
    exact, _, _ = prune(net_proto(), "prune{ratio=0.2,round-to=1}")
    assert conv_input_channels(auto) == conv_input_channels(exact)
    assert 13 in conv_input_channels(auto)


def test_round_to_counts_channels_not_heads():
    model, _, records = prune(prepared("vit_b16", "legacy"), "prune{ratio=0.3,round-to=8}")
    heads = [s for s in _shape_constants(model, 4) if s[:2] == [2, 17]]
    assert heads and all(s[2:] == [3, 16] for s in heads)  # 1 of 4 heads of 16 channels gone: 48 channels
    weights = [np.asarray(n.inputs[1].values).shape for n in model.graph.nodes
               if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    assert sorted(s for s in weights if s[0] == 64 and s[1] > 64) == [(64, 184)] * 2  # each MLP's 256 keep 184, not 180


def test_target_macs_is_met_closely_with_coarse_rounding():
    original = wide()
    before = model_cost(Model.from_proto(original)).total_macs
    # Rounded counts step together at one ratio: the first ratio reaching 0.5 keeps 40 of every 64 channels and
    # removes 0.59 of the MACs. Taking that cut one layer at a time stops at 0.52.
    for text in ("prune{target-macs=0.5,round-to=8}", "prune{target-macs=0.5,round-to=8,scope=global}"):
        model, _, records = prune(original, text)
        achieved = 1 - model_cost(model).total_macs / before
        assert 0.5 <= achieved <= 0.53, (text, achieved)
        assert all(c % 8 == 0 for c in conv_input_channels(model)[1:])
