"""prune on models exported with a dynamic batch: reshape targets and recurrent initial states are then built at
run time from Shape (torch's x.view(B, ...), h0 of the batch size). A Shape read only for other dims than the
channels is no lock, and a target built as Concat(batch from Shape, constants) has its channel entry rewritten.
Before, ShuffleNetV2 (torchscript) lost 168 channels instead of 210 and the LSTM keyword spotter (dynamo) 32
instead of 128."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from irtool.analysis.channels import ChannelGroups
from irtool.api import optimize
from irtool.frontends.torch import export_module
from irtool.ir.model import Model
from irtool.passmanager import PassContext
from tests.prune.archs import ARCHS, GQAttention, Llama, init_weights, rotate_half
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run

CASES = [("shufflenet_v2", "torchscript", 210), ("speech_lstm", "torchscript", 128), ("speech_lstm", "dynamo", 128),
         ("shufflenet_v2", "dynamo", 210),
         # nn.MultiheadAttention folds its heads into the batch: half of 4 heads and 256 MLP channels per block
         ("vit_torchvision", "torchscript", 2 * (2 + 128)), ("vit_torchvision", "dynamo", 2 * (2 + 128)),
         # windows of a run-time batch (view(-1, windows, H, N, N) for the shifted windows' mask): heads and MLPs
         ("swin_tiny", "torchscript", 390), ("swin_tiny", "dynamo", 390),
         # grouped-query attention: Expand(k, Concat(B, KV, G, T, D)) keeps its kv entry; a kv head and SwiGLU
         ("llama", "torchscript", 2 * (1 + 64)), ("llama", "dynamo", 2 * (1 + 64))]


@pytest.mark.parametrize(("arch", "exporter", "removed_channels"), CASES, ids=[f"{a}-{e}" for a, e, _ in CASES])
def test_dynamic_batch_exports_prune_like_static_ones_and_equal_the_masked_original(arch, exporter,
                                                                                      removed_channels):
    factory, shape = ARCHS[arch]
    proto = export_module(init_weights(factory()), {"x": torch.randn(*shape)}, exporter=exporter,
                          dynamic_batch=True)
    original = optimize(proto, "cleanup").model.to_proto()
    assert not original.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # the batch is dynamic
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == removed_channels
    x = {"x": np.random.default_rng(2).standard_normal((3, *shape[1:])).astype(np.float32)}  # not the export's 2
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


class Tokens(torch.nn.Module):
    """A conv stem flattened into tokens, x.flatten(2): torchscript builds the target from Shape(x)[0:2] and -1
    with a dynamic batch, so the channel entry is x's own count and shape inference leaves the -1 symbolic."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 48, 3, padding=1)
        self.fc = torch.nn.Linear(48, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.stem(x)).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_flatten_whose_target_reads_its_own_shape_is_pruned(exporter):
    torch.manual_seed(0)
    proto = export_module(Tokens().eval(), {"x": torch.randn(2, 3, 6, 6)}, exporter=exporter, dynamic_batch=True)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 24
    x = {"x": np.random.default_rng(3).standard_normal((3, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_multi_query_attention_prunes_query_heads_alone(exporter):
    """One k/v head repeated for 4 query heads (Expand [B, 1, 4, T, D]): query heads go, two per block, with the
    repeat's count; the k/v projections keep their one head. Before, every head locked."""
    proto = export_module(init_weights(Llama(kv=1)), {"x": torch.randn(2, 16, 64)}, exporter=exporter,
                          dynamic_batch=True)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert [(g["before"], g["after"]) for g in records[0].stats["groups"]] == [(4, 2), (128, 64)] * 2
    widths = sorted(np.asarray(n.inputs[1].values).shape for n in model.graph.nodes
                    if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
    assert widths.count((64, 16)) == 4 and widths.count((64, 32)) == 2  # k and v whole, q two heads of 16
    x = {"x": np.random.default_rng(2).standard_normal((3, 16, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


class Conv1D(torch.nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils): x.view(-1, x.size(-1)), addmm, view back to x.size()[:-1] + nf.
    torch's legacy exporter reads x.size(-1) as Unsqueeze(Squeeze(Slice(Shape(x), -1))) into the view's target."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.size(-1),)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(torch.nn.Module):
    """GPT-2's attention and MLP around Conv1D layers, heads split with view(B, T, H, D)."""

    def __init__(self, c: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.ln1, self.ln2 = heads, torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.c_attn, self.c_proj = Conv1D(c, 3 * c), Conv1D(c, c)
        self.c_fc, self.c_out = Conv1D(c, 4 * c), Conv1D(4 * c, c)

    def forward(self, x):
        q, k, v = self.c_attn(self.ln1(x)).split(x.size(-1), dim=2)
        split = [t.view(*t.size()[:-1], self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        h = torch.nn.functional.scaled_dot_product_attention(*split, is_causal=True)
        x = x + self.c_proj(h.transpose(1, 2).contiguous().view(*x.size()))
        return x + self.c_out(torch.nn.functional.gelu(self.c_fc(self.ln2(x))))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_dynamic_sequence_length_prunes_like_a_static_one(exporter):
    """Exported with batch and sequence dynamic (as Hugging Face models are), the Conv1D views' targets read B and T
    off Shape at run time. The analysis sizes the batch with a stand-in; the sequence stayed symbolic, so the views
    had no static shape to follow and every channel of a GPT-2 locked. Other named dims now get stand-ins too."""
    torch.manual_seed(0)
    proto = export_module(init_weights(GPT2Block()), {"x": torch.randn(2, 6, 32)}, exporter=exporter,
                          dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    original = optimize(proto, "cleanup").model.to_proto()
    assert [d.dim_param for d in original.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 2 + 64  # half the heads, half the MLP
    x = {"x": np.random.default_rng(2).standard_normal((3, 9, 32)).astype(np.float32)}  # not the export's 2 x 6
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: the k/v head count is read off the tensor's shape."""
    batch, num_key_value_heads, slen, head_dim = hidden.shape
    hidden = hidden[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class HFAttention(GQAttention):
    """GQAttention as transformers writes it: heads split with view(B, T, -1, D), then repeat_kv."""

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.d).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        cos, sin = self.cos[:t], self.sin[:t]
        q, k, v = self._heads(self.q(x), self.heads), self._heads(self.k(x), self.kv), self._heads(self.v(x), self.kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.heads // self.kv), repeat_kv(v, self.heads // self.kv)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_repeat_kv_reading_its_head_count_at_run_time_keeps_kv_heads_free(exporter):
    """With batch and sequence dynamic, the legacy exporter writes repeat_kv's target as
    [B, Mul(Gather(Shape(k), 1), n_rep), T, D] and its Expand's target from Shape(k) too: the Shape read locked a k/v
    head per block (128 channels removed instead of 130). Both entries follow the pruning by themselves."""
    torch.manual_seed(0)
    llama = Llama()
    for block in llama.blocks:
        state = block.attn.state_dict()
        block.attn = HFAttention(64, 4, 2, 16)
        block.attn.load_state_dict(state)
    proto = export_module(init_weights(llama), {"x": torch.randn(2, 16, 64)}, exporter=exporter,
                          dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 2 * (1 + 64)  # a k/v head (with its query heads) and SwiGLU
    x = {"x": np.random.default_rng(2).standard_normal((3, 9, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)



def unknown_batch_operand() -> onnx.ModelProto:
    """x [B, T, 16] plus an operand whose first dim has no name (as a mask built at run time has), flattened to
    [B*T, 16] for a Gemm (16 -> 32) and viewed back to Shape(x)[:2] + [32], Relu, MatMul (32 -> 4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 4)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("flat", [-1, 16]), ("starts", [0]), ("ends", [2]), ("width", [32]))]
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"]), helper.make_node("Reshape", ["h", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "w1"], ["g"]), helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "starts", "ends"], ["bt"]),
             helper.make_node("Concat", ["bt", "width"], ["target"], axis=0),
             helper.make_node("Reshape", ["g", "target"], ["r"]), helper.make_node("Relu", ["r"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 16]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [None, 1, 16])]
    graph = helper.make_graph(nodes, "unknown", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_given_batch_of_one_prunes_like_a_symbolic_batch():
    """--input-shape x:1x6x16: at 1, shape inference broadcasts the 1 to the other operand's unknown dim, and the
    reshapes after it lost their static shapes (a GPT-2 given input_ids:1x12, its [B, 1, T, T] mask built at run
    time: every channel locked). The analysis uses its stand-ins for a named dim given as 1."""
    free = {shapes and shapes["x"][0]: sum(g.size for g in PassContext(input_shapes=shapes).analysis(
        ChannelGroups, Model.from_proto(unknown_batch_operand())).groups if g.locked is None)
        for shapes in (None, {"x": [1, 6, 16]}, {"x": [2, 6, 16]})}
    assert free == {None: 32, 1: 32, 2: 32}
