"""Elementwise ops keep channels where they are, whatever they compute. ALBERT's attention (Hugging Face, either
torch exporter) cleans its probabilities with Where(IsNaN(p), 0, p); IsNaN had no channel handler and every head
was locked. The unary math ops, comparisons and logic ops are channel pass-throughs too."""

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

OPS = {
    "isnan": lambda h: torch.where(torch.isnan(h), torch.zeros_like(h), h),
    "isinf": lambda h: torch.where(torch.isinf(h), torch.zeros_like(h), h),
    "compare": lambda h: torch.where(h > 0.5, h, 0.1 * h) + (h <= -1).float(),
    "logic": lambda h: h * ((h > 0) & (h < 2) | ~(h > -1)).float(),
    "log": lambda h: torch.log(h.abs() + 1),
    "reciprocal": lambda h: torch.reciprocal(h.abs() + 1),
    "rounding": lambda h: torch.floor(h) + torch.ceil(h) + torch.round(h) + torch.sign(h),
    "trig": lambda h: torch.sin(h) + torch.cos(h),
    "mish": nn.functional.mish,
    "celu": nn.functional.celu,
    "fmod": lambda h: torch.fmod(h, 0.75),
}


class Between(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op, self.fc1, self.fc2 = OPS[op], nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.op(self.fc1(x)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("op", list(OPS))
def test_elementwise_ops_pass_channels_through(op, exporter):
    torch.manual_seed(0)
    proto = export_module(init_weights(Between(op)), {"x": torch.randn(3, 8)}, exporter=exporter)
    original = optimize(proto, "cleanup").model.to_proto()
    graph = analysis(original)
    assert sum(g.size for g in graph.groups if g.locked is None) == 16, [g.locked for g in graph.groups]
    model, removed, _ = prune(original, "prune{ratio=0.5}")
    x = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32) * 2}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)
