"""prune through a Flatten that starts at the channel axis wherever it is: LeViT (Hugging Face's LevitModel) puts a
BatchNorm1d after each token Linear, x.flatten(0, 1) -> [B*N, C], then reshapes back. torch's legacy exporter writes
Flatten(axis=2), which locked every such layer (14 of 703 channels free in a small LeViT, against 351 removed now,
the same as from its torch.export)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from irtool.api import optimize
from irtool.frontends.torch import export_module
from tests.prune.archs import init_weights
from tests.prune.test_prune_archs import analysis
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


class LinearBN(nn.Module):
    """LeViT's MLPLayerWithBN: a token Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        h = self.linear(x)
        return self.bn(h.flatten(0, 1)).reshape_as(h)


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = LinearBN(16, 32), LinearBN(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.down(nn.functional.hardswish(self.up(x))))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_batch_norm_over_flattened_tokens_prunes_and_equals_the_masked_original(exporter):
    torch.manual_seed(0)
    proto = export_module(init_weights(TokenMLP()), {"x": torch.randn(2, 5, 16)}, exporter=exporter)
    original = optimize(proto, "cleanup").model.to_proto()
    # the hidden 32 are free; the stream's 16 channels are the input's
    assert sum(g.size for g in analysis(original).groups if g.locked is None) == 32
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 16
    x = {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)
