"""prune through a pixel shuffle (DepthToSpace: super-resolution nets' upsampler) and through nn.GroupNorm as torch's
legacy exporter writes it with a dynamic batch (Reshape to groups, InstanceNormalization, Reshape back to the conv
output's own Shape). Before, DepthToSpace had no channel handler and the Shape read locked the GroupNorm's conv:
an ESPCN-like net lost nothing before its upsampler, the GroupNorm net nothing in its normalized layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from irtool.api import optimize
from irtool.frontends.torch import export_module
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


class SuperResolution(nn.Module):
    """ESPCN's shape with one conv after the shuffle: features, 4x16 channels, PixelShuffle(2) to 16, then RGB."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 64, 3, padding=1))
        self.shuffle = nn.PixelShuffle(2)
        self.rgb = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        return self.rgb(torch.relu(self.shuffle(self.features(x))))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.GroupNorm(8, 32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.stem(x))))


def _pruned(module: nn.Module, exporter: str, dynamic_batch: bool, shape=(2, 3, 8, 8)):
    torch.manual_seed(0)
    proto = export_module(module.eval(), {"x": torch.randn(*shape)}, exporter=exporter, dynamic_batch=dynamic_batch)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5,round-to=1}")
    batch = 3 if dynamic_batch else shape[0]
    x = {"x": np.random.default_rng(4).standard_normal((batch, *shape[1:])).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)
    return model, records[0].stats["channels_removed"]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_pixel_shuffle_removes_whole_blocks_of_its_input(exporter):
    torch.manual_seed(0)
    model, removed = _pruned(SuperResolution(), exporter, dynamic_batch=True)
    convs = [n for n in model.graph.nodes if n.op == "Conv"]
    upsampled = np.asarray(convs[1].inputs[1].values).shape[0]
    # counted in atoms: 16 feature channels, and 8 of the 16 shuffled channels, each 4 of the conv's 64
    assert removed == 16 + 8 and upsampled == 32
    assert np.asarray(convs[2].inputs[1].values).shape[1] == 8


def test_depth_to_space_in_dcr_mode_and_space_to_depth_tie_strided_channels():
    """DCR (TensorFlow's depth_to_space) and SpaceToDepth interleave: channel c of the shallow side is k*C + c."""
    from tests.prune.graphgen import random_cnn

    modes = []
    for seed in range(12):
        original = random_cnn(seed, ["pixel_shuffle"])
        shuffle = next(n for n in original.graph.node if n.op_type == "DepthToSpace")
        modes.append(next(a.s for a in shuffle.attribute if a.name == "mode"))
        model, removed, _ = prune(original, "prune{ratio=0.5,round-to=1}")
        before = next(t for t in original.graph.initializer if t.name == _weight_of(original, shuffle.input[0]))
        after = next(n for n in model.graph.nodes if n.outputs[0].name == shuffle.input[0]).inputs[1]
        assert np.asarray(after.values).shape[0] < before.dims[0], f"seed {seed}: nothing removed before the shuffle"
        x = {"x": np.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(np.float32)}
        np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=2e-4,
                                   atol=2e-4, err_msg=f"seed {seed}")
    assert set(modes) == {b"CRD", b"DCR"}


def _weight_of(proto, tensor: str) -> str:
    return next(n.input[1] for n in proto.graph.node if tensor in n.output)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_group_norm_exported_with_a_dynamic_batch_prunes_whole_groups(exporter):
    _, static = _pruned(GroupNormNet(), exporter, dynamic_batch=False)
    model, removed = _pruned(GroupNormNet(), exporter, dynamic_batch=True)
    assert removed == static == 4  # atoms: 4 of the 8 groups of 4 channels
    stem = next(n for n in model.graph.nodes if n.op == "Conv")
    assert np.asarray(stem.inputs[1].values).shape[0] == 16
