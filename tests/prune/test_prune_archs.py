"""Pruning real architectures end to end (tests/prune/archs.py), each exported by torch's legacy
(TorchScript, opset 17) and dynamo (opset 18) exporters: prune{ratio=0.5} must verify after the pass,
run in ONNX Runtime with unchanged output shapes, equal the masking oracle, and remove a real share of
parameters and MACs. Exports are cached for the session (the dynamo exporter takes seconds per model).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from irtool.analysis.channels import ChannelGraph, ChannelGroups
from irtool.analysis.cost import model_cost
from irtool.ir import Model
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline
from tests.prune.archs import ARCHS, export_arch
from tests.prune.graphgen import random_cnn
from tests.prune.test_prune_masking import masked, prune

EXPORTERS = {"legacy": False, "dynamo": True}


@dataclass(frozen=True)
class Expect:
    """What prune{ratio=0.5} must reach on an architecture (same for both exporters)."""

    free_atoms: int  # channels the analysis may remove (atoms of unlocked groups)
    locks: tuple[str, ...]  # every lock reason contains one of these
    min_params: float  # minimum fraction of parameters removed
    min_macs: float  # minimum fraction of MACs removed


# Observed at ratio 0.5 (both exporters): resnet18 -74.8% params / -69.4% MACs, resnet50 -74.4/-67.0,
# mobilenet_v2 -69.1/-65.6, efficientnet_b0 -68.5/-64.3, shufflenet_v2 -71.0/-58.8,
# convnext_tiny -35.8/-35.1 (only the MLP hidden dims are free), vit_b16 -43.4/-44.4, swin_tiny -45.3/-45.8
# (MLP hidden dims and heads), yolo -74.7/-73.7,
# llama -45.3/-45.5 (its LM head stays whole),
# speech_lstm -74.1/-74.6 (Torch-Pruning 1.6 asserts num_layers == 1 on its two LSTM layers), edsr -74.6/-74.1
# (its upsampler's conv loses whole pixel-shuffle blocks: 4 of its channels per shuffled channel).
OUTPUT = "is a graph output"
EXPECT = {
    "resnet18": Expect(720, (OUTPUT,), 0.6, 0.6),
    "resnet50": Expect(968, (OUTPUT,), 0.6, 0.6),
    "mobilenet_v2": Expect(844, (OUTPUT,), 0.6, 0.6),
    "efficientnet_b0": Expect(944, (OUTPUT,), 0.6, 0.6),
    "shufflenet_v2": Expect(420, (OUTPUT,), 0.6, 0.5),
    "convnext_tiny": Expect(1024, (OUTPUT, "LayerNormalization", "reduces over the channel axis"), 0.3, 0.3),
    "vit_b16": Expect(2 * (4 + 256), (OUTPUT, "LayerNormalization"), 0.35, 0.35),
    "vit_torchvision": Expect(2 * (4 + 256), (OUTPUT, "LayerNormalization"), 0.35, 0.35),  # heads as in vit_b16
    "swin_tiny": Expect(2 * (128 + 256) + 2 * (2 + 4), (OUTPUT, "LayerNormalization"), 0.4, 0.4),  # MLPs, heads
    "yolo": Expect(1824, (OUTPUT,), 0.6, 0.6),
    "speech_lstm": Expect(64 + 96 + 96, (OUTPUT,), 0.6, 0.6),
    "edsr": Expect(4 * 48, (OUTPUT,), 0.6, 0.6),  # residual stream, two blocks' inner convs, shuffled channels
    # per block: 2 k/v heads (each with its 2 query heads) and 128 SwiGLU channels; the residual stream is the input
    "llama": Expect(2 * (2 + 128), (OUTPUT, "'x' with channels from nowhere"), 0.4, 0.4),
}
CASES = [pytest.param(a, e, id=f"{a}-{e}") for a in ARCHS for e in EXPORTERS]


# ----------------------------------------------------------------------------------------- fixtures
_PREPARED: dict[tuple[str, str], onnx.ModelProto] = {}


def prepared(arch: str, exporter: str) -> onnx.ModelProto:
    """The export with its shape arithmetic folded: the legacy exporter computes chunk sizes from Shape
    at run time, which would lock those channels. One cleanup folds them (fold-constants sweeps until
    nothing changes)."""
    key = (arch, exporter)
    if key not in _PREPARED:
        model = Model.from_proto(export_arch(arch, EXPORTERS[exporter]))
        records = PassManager(parse_pipeline("cleanup").build()).run(model, PassContext())
        assert not PassManager(parse_pipeline("fold-constants").build()).run(model, PassContext())[0].modified
        assert records
        _PREPARED[key] = model.to_proto()
    return _PREPARED[key]


_PRUNED: dict[tuple[str, str], tuple] = {}


def pruned(arch: str, exporter: str):
    key = (arch, exporter)
    if key not in _PRUNED:
        _PRUNED[key] = prune(prepared(arch, exporter), "prune{ratio=0.5}")  # verify_each=True inside
    return _PRUNED[key]


def run_all(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def analysis(proto: onnx.ModelProto) -> ChannelGraph:
    return PassContext().analysis(ChannelGroups, Model.from_proto(proto))


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_pruned_arch_runs_and_equals_masked_original(arch, exporter):
    original = prepared(arch, exporter)
    model, removed, records = pruned(arch, exporter)
    assert records[0].modified and records[0].stats["channels_removed"] > 0
    x = np.random.default_rng(1).standard_normal(ARCHS[arch][1]).astype(np.float32)
    reference, oracle = run_all(original, x), run_all(masked(original, removed), x)
    outputs = run_all(model.to_proto(), x)
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    scale = max(1.0, max(float(np.abs(o).max()) for o in oracle))
    error = max(float(np.abs(a - b).max()) for a, b in zip(outputs, oracle, strict=True))
    assert error <= 1e-5 * scale, f"pruned model differs from the masked original by {error:.3g}"
    masking = max(float(np.abs(a - b).max()) for a, b in zip(reference, oracle, strict=True))
    assert masking > 1e-2 * max(float(np.abs(r).max()) for r in reference)  # the oracle is not vacuous

    before, after = model_cost(Model.from_proto(original)), model_cost(model)
    expect = EXPECT[arch]
    assert 1 - after.total_params / before.total_params >= expect.min_params
    assert 1 - after.total_macs / before.total_macs >= expect.min_macs


@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_target_macs_lands_within_five_percent(arch, exporter):
    original = prepared(arch, exporter)
    model, _, records = prune(original, "prune{target-macs=0.5}")
    x = np.random.default_rng(2).standard_normal(ARCHS[arch][1]).astype(np.float32)
    assert [o.shape for o in run_all(model.to_proto(), x)] == [o.shape for o in run_all(original, x)]
    before, after = model_cost(Model.from_proto(original)), model_cost(model)
    achieved = 1 - after.total_macs / before.total_macs
    assert abs(achieved - 0.5) <= 0.05, f"{arch}: removed {achieved:.3f} of the MACs for a 0.5 target"
    assert abs(records[0].stats["estimated_mac_reduction"] - achieved) <= 0.02


@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_free_channels_and_lock_reasons(arch, exporter):
    graph = analysis(prepared(arch, exporter))
    expect = EXPECT[arch]
    assert sum(g.size for g in graph.groups if g.locked is None) == expect.free_atoms
    reasons = {g.locked for g in graph.groups if g.locked}
    assert reasons and all(any(k in r for k in expect.locks) for r in reasons), reasons


def _shape_constants(model: Model, rank: int) -> list[list[int]]:
    return [np.asarray(n.inputs[1].values).tolist() for n in model.graph.nodes
            if n.op == "Reshape" and np.asarray(n.inputs[1].values).size == rank]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_channel_shuffle_keeps_group_count_and_prunes_positions(exporter):
    model, _, _ = pruned("shufflenet_v2", exporter)
    before = _shape_constants(Model.from_proto(prepared("shufflenet_v2", exporter)), 5)
    after = _shape_constants(model, 5)
    assert len(after) == len(before) == 7
    for old, new in zip(before, after, strict=True):
        assert new[:2] == old[:2] == [2, 2] and new[3:] == old[3:]  # two groups, spatial dims kept
        assert new[2] == old[2] // 2  # half of the positions p go, the same ones in both groups


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_vit_prunes_whole_heads(exporter):
    model, _, _ = pruned("vit_b16", exporter)
    heads = [s for s in _shape_constants(model, 4) if s[:2] == [2, 17]]
    assert len(heads) == 6 and all(s[2:] == [2, 16] for s in heads)  # 4 heads -> 2, head dim 16 kept
    weights = sorted(tuple(np.asarray(n.inputs[1].values).shape) for n in model.graph.nodes
                     if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
    # per block: q, k, v [64, 32], proj [32, 64], mlp [64, 128] and [128, 64]
    assert weights == sorted([(64, 32)] * 6 + [(32, 64)] * 2 + [(64, 128)] * 2 + [(128, 64)] * 2)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_swin_prunes_whole_heads_of_its_fused_qkv(exporter):
    """timm's qkv Linear [C, 3·H·D] is split by reshape [B, N, 3, H, D] and unbind(0): a head goes from q, k and
    v at once, and from the relative position bias [1, H, N, N] added to its scores."""
    model, _, _ = pruned("swin_tiny", exporter)
    splits = [n for n in model.graph.nodes if n.op == "Reshape" and np.asarray(n.inputs[1].values).size == 5
              and n.outputs[0].outputs[0].op == "Transpose"]
    bias_adds = [n.inputs[0].inputs[0] for n in splits]  # Reshape(Add(MatMul(x, W), b)), operands in either order
    qkv = [next(t.inputs[0] for t in add.inputs if t.inputs and t.inputs[0].op == "MatMul") for add in bias_adds]
    assert [np.asarray(n.inputs[1].values)[2:].tolist() for n in splits] == [[3, 1, -1]] * 2 + [[3, 2, -1]] * 2
    assert [np.asarray(n.inputs[1].values).shape for n in qkv] == [(32, 48)] * 2 + [(64, 96)] * 2  # 3 · heads · 16
    biases = sorted(np.asarray(n.inputs[1].values).shape for n in model.graph.nodes
                    if n.op == "Add" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.ndim == 4)
    assert biases == [(1, 1, 16, 16)] * 2 + [(1, 2, 16, 16)] * 2


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_llama_removes_kv_heads_with_their_query_heads(exporter):
    """Grouped-query attention: a k/v head goes with the two query heads it serves, through RoPE's rotate-half
    and the Expand that repeats it; the Expand's kv entry becomes 1 (keep the input's count)."""
    model, _, _ = pruned("llama", exporter)
    weights = sorted(np.asarray(n.inputs[1].values).shape for n in model.graph.nodes
                     if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
    # per block: q [64, 2·16], k and v [64, 1·16], o [2·16, 64], SwiGLU gate, up [64, 64] and down [64, 64]
    assert weights == sorted([(64, 32), (64, 16), (64, 16), (32, 64)] * 2 + [(64, 64)] * 6 + [(64, 100)])
    expands = [np.asarray(n.inputs[1].values).tolist() for n in model.graph.nodes if n.op == "Expand"]
    assert expands == [[2, 1, 2, 16, 16]] * 4  # [B, KV, group, T, D]: two query heads per kv head


def _prune_generated(kinds: list[str], seed: int = 5):
    original = random_cnn(seed, kinds)
    model, removed, records = prune(original, "prune{ratio=0.5}")
    x = np.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_all(model.to_proto(), x)[0], run_all(masked(original, removed), x)[0],
                               rtol=1e-4, atol=1e-5)
    return original, model


def test_grouped_conv_removes_the_same_positions_from_every_group():
    original, model = _prune_generated(["conv", "grouped", "conv"], seed=1)  # group 2: W [6, 5, 3, 3]
    conv = lambda m: next(n for n in m.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1)  # noqa: E731
    before, after = conv(Model.from_proto(original)), conv(model)
    group = before.attrs["group"]
    w0, w1 = np.asarray(before.inputs[1].values), np.asarray(after.inputs[1].values)
    assert after.attrs["group"] == group
    assert w1.shape[0] % group == 0 and w1.shape[0] < w0.shape[0] and w1.shape[1] < w0.shape[1]


def test_group_norm_removes_whole_groups():
    original, model = _prune_generated(["bn", "groupnorm"], seed=5)
    before = next(n for n in Model.from_proto(original).graph.nodes if n.op == "GroupNormalization")
    after = next(n for n in model.graph.nodes if n.op == "GroupNormalization")
    groups, channels = before.attrs["num_groups"], np.asarray(before.inputs[1].values).size
    kept = after.attrs["num_groups"]
    assert 0 < kept < groups and np.asarray(after.inputs[1].values).size == channels // groups * kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3])  # Gather or Split+Squeeze picks, 2 or 3 heads, with or without bias
def test_fused_qkv_attention_prunes_whole_heads(seed):
    """One packed projection [c, 3·H·D] reshaped to [2, 16, 3, H, D]: H is the carrier, not the 3 that q, k and v
    are picked from (with 3 heads both axes give 3 atoms, and picking along the carrier would lock it)."""
    original, model = _prune_generated(["conv", "attention_fused"], seed=seed)
    graph = analysis(original)
    assert not any("MatMul" in g.locked or "Squeeze" in g.locked or "Gather" in g.locked
                   for g in graph.groups if g.locked)

    def qkv_split(m: Model) -> np.ndarray:
        return next(np.asarray(n.inputs[1].values) for n in m.graph.nodes
                    if n.op == "Reshape" and np.asarray(n.inputs[1].values).size == 5)

    old, new = qkv_split(Model.from_proto(original)), qkv_split(model)
    assert new[2] == old[2] == 3 and new[3] < old[3] and new[4] == old[4]  # fewer heads, q, k, v and head dim kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])  # 1-3 kv heads, 1-2 query heads each, kv or 1 in the target
def test_grouped_query_attention_prunes_kv_heads_with_their_query_heads(seed):
    """A kv head goes with the query heads it serves. With one kv head (seeds 0 and 5: multi-query attention) its
    copies for the query heads are channels of their own: query heads go alone, the kv head stays."""
    original, model = _prune_generated(["conv", "attention_gqa"], seed=seed)
    assert not any(k in g.locked for g in analysis(original).groups if g.locked for k in ("MatMul", "Expand"))

    def widths(m: Model) -> list[int]:  # of the q, k and v projections: heads · D, kv heads · D, kv heads · D
        return [np.asarray(n.inputs[1].values).shape[1] for n in m.graph.nodes
                if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)][:3]

    before = Model.from_proto(original)
    dim = int(next(np.asarray(n.inputs[1].values)[3] for n in before.graph.nodes if n.op == "Reshape"
                   and np.asarray(n.inputs[1].values).size == 4))  # q's split [2, 16, H, D]
    (q, k, v), (kept_q, kept_k, kept_v) = widths(before), widths(model)
    assert k == v and kept_k == kept_v and kept_q < q
    if k == dim:  # one kv head, kept
        assert kept_k == k
    else:  # whole groups
        assert kept_k < k and kept_q * k == q * kept_k
    merges = [np.asarray(n.outputs[0].outputs[0].inputs[1].values) for n in model.graph.nodes if n.op == "Expand"]
    assert [m[1] * m[3] for m in merges] == [kept_q] * 2  # k and v repeated to the kept query heads


def test_attention_prunes_heads_through_a_shared_reshape_constant():
    original, model = _prune_generated(["conv", "attention"], seed=5)

    def head_splits(m: Model) -> list[gs.Node]:
        return [n for n in m.graph.nodes if n.op == "Reshape" and n.outputs[0].outputs[0].op == "Transpose"
                and np.asarray(n.inputs[1].values).size == 4 and n.inputs[1].values[1] == 16]

    before, after = head_splits(Model.from_proto(original)), head_splits(model)
    assert len(before) == len(after) == 3 and len({n.inputs[1].name for n in before}) == 1  # q, k, v share it
    old = np.asarray(before[0].inputs[1].values)
    for node in after:  # each reads its own rewritten constant: fewer heads, same head dim
        new = np.asarray(node.inputs[1].values)
        assert new[2] < old[2] and new[3] == old[3] and node.inputs[1].name != before[0].inputs[1].name


def _zero_biases(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The export with every bias zero, as a freshly initialised transformer has them, then cleaned up: one
    initializer (dedup-initializers) for all equal biases, read by the layers of every block."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name.endswith("bias") and len(init.dims) == 1:
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(init.dims), np.float32), init.name))
    model = Model.from_proto(out)
    PassManager(parse_pipeline("cleanup").build()).run(model, PassContext())
    return model.to_proto()


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["vit_b16", "vit_torchvision", "swin_tiny"])
def test_merged_zero_biases_do_not_tie_their_layers(arch, exporter):
    """A constant several unrelated layers add is copied for each of them when their channels differ; tying
    them (the rule for one layer applied twice) halved the free channels of these models."""
    original = _zero_biases(export_arch(arch, EXPORTERS[exporter]))
    biases = {i.name for i in original.graph.initializer if not np.any(onnx.numpy_helper.to_array(i))}
    assert max(Counter(i for n in original.graph.node for i in n.input if i in biases).values()) >= 4
    assert sum(g.size for g in analysis(original).groups if g.locked is None) == EXPECT[arch].free_atoms
    model, removed, _ = prune(original, "prune{ratio=0.5}")
    x = np.random.default_rng(1).standard_normal(ARCHS[arch][1]).astype(np.float32)
    oracle = run_all(masked(original, removed), x)
    for out, ref in zip(run_all(model.to_proto(), x), oracle, strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
