"""prune through nn.MultiheadAttention as torch exports it (the attention of nn.Transformer*, torchvision's ViT,
DETR): one packed in-projection, heads folded into the batch ([T, B·H, D]) and unfolded again ([B, H, T, D]) before
the scores. Whole heads go. Before, the fold's reshape put the channels on D, which the score MatMul contracts, and
every head stayed; with a dynamic batch the fold had no static shape to follow (the analysis now infers shapes at a
stand-in batch size), and the TorchScript exporter computes B·H at run time (Shape · num_heads: the num_heads
constant is rewritten to the kept count)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from irtool.analysis.channels import BATCH_STANDIN, _baked_batch
from irtool.analysis.shapes import ShapeInfo
from irtool.api import optimize
from irtool.frontends.torch import export_module
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


class SelfAttention(torch.nn.Module):
    """Tokens [N, 10, 16] -> 32 wide, 4 heads of 8, mean over the tokens, 5 classes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 32)
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _in_projection_widths(proto: onnx.ModelProto) -> list[int]:
    """Output widths of the packed q/k/v projections (the initializers named after in_proj)."""
    return sorted(int(t.dims[0]) for t in proto.graph.initializer if "in_proj_bias" in t.name)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("module", [SelfAttention, Encoder], ids=["multihead_attention", "transformer_encoder"])
def test_whole_heads_are_removed_and_the_model_equals_the_masked_original(module, exporter, dynamic):
    torch.manual_seed(0)
    example = torch.randn(2 if dynamic else 1, 10, 16)
    proto = export_module(module().eval(), {"x": example}, exporter=exporter, dynamic_batch=dynamic)
    original = optimize(proto, "cleanup").model.to_proto()
    assert bool(original.graph.input[0].type.tensor_type.shape.dim[0].dim_param) == dynamic
    assert _in_projection_widths(original) == [96]
    model, removed, _ = prune(original, "prune{ratio=0.5}")
    pruned = model.to_proto()
    assert _in_projection_widths(pruned) == [48]  # q, k and v of 2 of the 4 heads, 8 wide each
    for batch in (1, 3) if dynamic else (1,):  # neither the export's batch nor the analysis's stand-in
        x = {"x": np.random.default_rng(batch).standard_normal((batch, 10, 16)).astype(np.float32)}
        reference, oracle = run(original, x), run(masked(original, removed), x)
        np.testing.assert_allclose(run(pruned, x), oracle, rtol=1e-4, atol=1e-5)
        assert np.abs(reference - oracle).max() > 1e-2  # the oracle is not vacuous


def test_a_model_that_bakes_its_batch_keeps_the_symbolic_shapes():
    """The analysis infers shapes at a stand-in batch only if every dim the symbolic inference found static stays
    so; a changed one means the model holds its export's batch somewhere, where the stand-in proves nothing."""
    symbolic = ShapeInfo({"x": (1, ["n", 8]), "w": (1, [8, 4]), "t": (1, [2, 4])})
    same = ShapeInfo({"x": (1, [BATCH_STANDIN, 8]), "w": (1, [8, 4]), "t": (1, [2, 4])})
    baked = ShapeInfo({"x": (1, [BATCH_STANDIN, 8]), "w": (1, [8, 4]), "t": (1, [BATCH_STANDIN, 4])})
    assert not _baked_batch(symbolic, same) and _baked_batch(symbolic, baked)
