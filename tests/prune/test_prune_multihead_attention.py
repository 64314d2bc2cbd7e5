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
from tests.prune.archs import init_weights
from tests.prune.test_prune_archs import analysis
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


class LearnedQueries(torch.nn.Module):
    """DETR's decoder at toy size: 6 learned queries (a parameter expanded to the batch) attend to the encoded
    tokens, then a decoder layer on top; the queries are also the first residual. At a static batch the queries'
    side folds to constants (their projection, their heads [B, H, 6, D]); with a dynamic batch the Expand stays."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 32)
        self.query = torch.nn.Parameter(torch.randn(1, 6, 32))
        self.cross = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.decoder = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        memory = torch.relu(self.embed(x))
        q = self.query.expand(x.shape[0], -1, -1)
        q = q + self.cross(q, memory, memory, need_weights=False)[0]
        return self.head(self.decoder(q, memory))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_learned_queries_lose_whole_heads_of_their_cross_attention(exporter, dynamic):
    """With a dynamic batch the TorchScript exporter writes expand(B, -1, -1)'s shape as Where(Equal(shape, -1), 1,
    shape), which shape inference cannot follow: cleanup's fold-constants resolves it (a dim is never -1)."""
    # init_weights: torch zeroes the attention's biases, and dedup-initializers would merge them into one shared
    # constant whose readers' channels are then tied (as a bias of a layer applied twice): not this test's subject
    proto = export_module(init_weights(LearnedQueries()), {"x": torch.randn(2, 10, 16)}, exporter=exporter,
                          dynamic_batch=dynamic)
    original = optimize(proto, "cleanup").model.to_proto()
    locks = {g.locked for g in analysis(original).groups if g.locked}
    assert not [r for r in locks if "MatMul" in r or "Add" in r], locks
    model, removed, records = prune(original, "prune{ratio=0.5}")
    heads = [g for g in records[0].stats["groups"] if g["before"] == 4]
    assert len(heads) == 3 and all(g["after"] == 2 for g in heads)  # the cross, self and decoder cross attention
    for batch in (2, 3) if dynamic else (2,):
        x = {"x": np.random.default_rng(batch).standard_normal((batch, 10, 16)).astype(np.float32)}
        reference, oracle = run(original, x), run(masked(original, removed), x)
        np.testing.assert_allclose(run(model.to_proto(), x), oracle, rtol=1e-4, atol=1e-5)
        assert np.abs(reference - oracle).max() > 1e-2


def test_a_model_that_bakes_its_batch_keeps_the_symbolic_shapes():
    """The analysis infers shapes at a stand-in batch only if every dim the symbolic inference found static stays
    so; a changed one means the model holds its export's batch somewhere, where the stand-in proves nothing."""
    symbolic = ShapeInfo({"x": (1, ["n", 8]), "w": (1, [8, 4]), "t": (1, [2, 4])})
    same = ShapeInfo({"x": (1, [BATCH_STANDIN, 8]), "w": (1, [8, 4]), "t": (1, [2, 4])})
    baked = ShapeInfo({"x": (1, [BATCH_STANDIN, 8]), "w": (1, [8, 4]), "t": (1, [BATCH_STANDIN, 4])})
    assert not _baked_batch(symbolic, same) and _baked_batch(symbolic, baked)


class MaskedEncoder(torch.nn.Module):
    """Self-attention with a Hugging Face style padding mask: mask[:, None, None, :].expand(B, 1, T, T), turned
    into -1e4 where padded and added to the scores of every head."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.dim = heads, width // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.fc = torch.nn.Linear(width, 5)

    def forward(self, x, mask):
        b, t, c = x.shape
        bias = (1.0 - mask[:, None, None, :].expand(b, 1, t, t).to(x.dtype)) * -10000.0
        q, k, v = (p(x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / self.dim ** 0.5 + bias
        return self.fc(self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_expanded_padding_mask_leaves_the_heads_free(exporter):
    """The mask's expanded rows meet the scores elementwise: they are no channels of their own (as multi-query
    attention's repeated k/v head is, merged by a Reshape), or the Add would tie them to the heads and lock both."""
    torch.manual_seed(0)
    feeds = {"x": torch.randn(2, 6, 32), "mask": torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])}
    proto = export_module(MaskedEncoder().eval(), feeds, exporter=exporter)
    original = optimize(proto, "cleanup").model.to_proto()
    graph = analysis(original)
    assert sum(g.size for g in graph.groups if g.locked is None) == 4 + 32  # heads, and the output projection's
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert (4, 2) in [(g["before"], g["after"]) for g in records[0].stats["groups"]]
    inputs = {k: v.numpy() for k, v in feeds.items()}
    np.testing.assert_allclose(run(model.to_proto(), inputs), run(masked(original, removed), inputs),
                               rtol=1e-4, atol=1e-4)
