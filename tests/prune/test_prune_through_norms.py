"""prune{through-norms=true}: channels a LayerNormalization normalizes over go too (the ViT residual stream).

Oracle: the original model with the removed channels masked in every consumer (test_prune_masking.masked) and
each such LayerNormalization computed over the kept channels only (gather them, normalize, scatter back as
zeros). Without the option those channels stay, and the lock says how to lift it."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from irtool.analysis.channels import Space
from irtool.analysis.cost import model_cost
from irtool.api import optimize
from irtool.frontends.torch import export_module
from irtool.ir import Model
from tests.prune.archs import ARCHS, init_weights
from tests.prune.test_prune_archs import EXPORTERS, analysis, prepared, run_all
from tests.prune.test_prune_masking import masked, prune


def over_kept(proto: onnx.ModelProto, removed: dict[str, list[int]], spaces: dict[str, Space]) -> onnx.ModelProto:
    """Every last-axis LayerNormalization whose input lost channels becomes gather -> norm -> scatter (zeros where
    channels went); every reduction over a channel axis that lost channels reads the kept ones only."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        gone = removed.get(node.input[0]) if node.input else None
        if gone and node.op_type == "LayerNormalization":
            nodes += _norm_over_kept(out, node, inits, gone)
        elif gone and node.op_type.startswith("Reduce") and _reduces(node, inits, spaces[node.input[0]]):
            kept = np.setdiff1d(np.arange(spaces[node.input[0]].size), gone).astype(np.int64)
            name = node.name or node.output[0]
            out.graph.initializer.append(numpy_helper.from_array(kept, f"{name}.kept"))
            nodes.append(helper.make_node("Gather", [node.input[0], f"{name}.kept"], [f"{name}.x"],
                                          axis=spaces[node.input[0]].axis))
            node.input[0] = f"{name}.x"
            nodes.append(node)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _reduces(node: onnx.NodeProto, inits: dict, space: Space) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = attrs.get("axes") or (numpy_helper.to_array(inits[node.input[1]]).tolist() if len(node.input) > 1 else [])
    return not axes or space.axis in [a % space.rank for a in axes]


def _norm_over_kept(out: onnx.ModelProto, node: onnx.NodeProto, inits: dict, gone: list[int]) -> list:
    scale = numpy_helper.to_array(inits[node.input[1]])
    kept = np.setdiff1d(np.arange(scale.shape[-1]), gone)
    select = np.zeros((len(kept), scale.shape[-1]), np.float32)
    select[np.arange(len(kept)), kept] = 1.0
    name = node.name or node.output[0]
    out.graph.initializer.extend([
        numpy_helper.from_array(kept.astype(np.int64), f"{name}.kept"),
        numpy_helper.from_array(select, f"{name}.scatter"),
        *[numpy_helper.from_array(numpy_helper.to_array(inits[p])[..., kept], f"{name}.{i}")
          for i, p in enumerate(node.input[1:]) if p]])
    params = [f"{name}.{i}" if p else "" for i, p in enumerate(node.input[1:])]
    return [helper.make_node("Gather", [node.input[0], f"{name}.kept"], [f"{name}.x"], axis=-1),
            helper.make_node("LayerNormalization", [f"{name}.x", *params], [f"{name}.y"],
                             axis=-1, epsilon=helper.get_node_attr_value(node, "epsilon")),
            helper.make_node("MatMul", [f"{name}.y", f"{name}.scatter"], [node.output[0]])]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_vit_residual_stream_is_pruned_and_equals_the_norms_over_kept_oracle(exporter):
    original = prepared("vit_b16", exporter)
    model, removed, records = prune(original, "prune{ratio=0.5,through-norms=true}")
    norms = [n for n in model.graph.nodes if n.op == "LayerNormalization"]
    assert len(norms) == 5 and all(np.asarray(n.inputs[1].values).shape == (32,) for n in norms)  # 64 -> 32
    assert next(n for n in model.graph.nodes if n.op == "Conv").inputs[1].values.shape[0] == 32  # patch embedding
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    oracle = over_kept(masked(original, removed), removed, analysis(original).spaces)
    np.testing.assert_allclose(run_all(model.to_proto(), x)[0], run_all(oracle, x)[0], rtol=1e-4, atol=1e-4)
    # not vacuous: the plain masking oracle (norms over all channels) is another function
    assert np.abs(run_all(masked(original, removed), x)[0] - run_all(oracle, x)[0]).max() > 1e-3
    before, after = model_cost(Model.from_proto(original)), model_cost(model)
    assert 1 - after.total_macs / before.total_macs > 0.65  # -44% without the option (test_prune_archs)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_convnext_layer_norms_written_out_are_pruned_through_too(exporter):
    """Its downsampling LayerNorm2d is ReduceMean/Sub/Pow/ReduceMean/Sqrt/Div over the channel axis."""
    original = prepared("convnext_tiny", exporter)
    model, removed, _ = prune(original, "prune{ratio=0.5,through-norms=true}")
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    oracle = over_kept(masked(original, removed), removed, analysis(original).spaces)
    np.testing.assert_allclose(run_all(model.to_proto(), x)[0], run_all(oracle, x)[0], rtol=1e-4, atol=1e-4)
    before, after = model_cost(Model.from_proto(original)), model_cost(model)
    assert 1 - after.total_macs / before.total_macs > 0.6  # -35% without the option: only the MLP hidden dims


def test_without_the_option_the_norm_locks_stay_and_say_how_to_lift_them(caplog):
    graph = analysis(prepared("vit_b16", "legacy"))
    soft = [g for g in graph.groups if g.soft]
    assert len(soft) == 1 and soft[0].size == 64 and "LayerNormalization" in soft[0].locked
    model, removed, _ = prune(prepared("vit_b16", "legacy"), "prune{ratio=0.5}")
    assert all(np.asarray(n.inputs[1].values).shape == (64,) for n in model.graph.nodes
               if n.op == "LayerNormalization")
    with caplog.at_level(logging.WARNING):
        prune(prepared("vit_b16", "legacy"), "prune{ratio=0.5,exclude=[fc, q, k, v, proj, mlp]}")
    assert "through-norms=true" in caplog.text


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_class_token_expanded_to_a_dynamic_batch_is_sliced_like_a_constant(exporter):
    """cls.expand(B, -1, -1): with a dynamic batch the Expand's shape is computed at run time (a Where over -1
    entries, or a Concat of the batch read off Shape), and the Concat joining it to the tokens locked the residual
    stream: 260 channels removed instead of the static export's 292."""
    factory, shape = ARCHS["vit_b16"]
    proto = export_module(init_weights(factory()), {"x": torch.randn(*shape)}, exporter=exporter,
                          dynamic_batch=True)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5,through-norms=true}")
    assert records[0].stats["channels_removed"] == 292
    cls = next(n for n in model.graph.nodes if n.op == "Expand").inputs[0]
    assert np.asarray(cls.values).shape == (1, 1, 32)
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)  # not the export's batch
    oracle = over_kept(masked(original, removed), removed, analysis(original).spaces)
    np.testing.assert_allclose(run_all(model.to_proto(), x)[0], run_all(oracle, x)[0], rtol=1e-4, atol=1e-4)


class LlamaLM(torch.nn.Module):
    """The zoo's Llama behind a token embedding: its residual stream starts at a Gather from the table."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 64)
        self.body = ARCHS["llama"][0]()

    def forward(self, ids):
        return self.body(self.embed(ids))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_decoders_hidden_size_goes_through_its_embedding_and_rms_norms(exporter):
    """An embedding lookup's columns are channels: the residual stream (soft locked by the RMSNorms written out,
    as LayerNorm's) loses half of its 64 with through-norms=true, the table with it. Before, the lookup's output
    had no channels and the first residual Add locked the stream."""
    proto = export_module(init_weights(LlamaLM()), {"ids": torch.randint(0, 100, (2, 16))}, exporter=exporter)
    original = optimize(proto, "cleanup").model.to_proto()
    stream = [g for g in analysis(original).groups if g.size == 64]
    assert len(stream) == 1 and stream[0].soft and "reduces over the channel axis" in stream[0].locked
    model, removed, records = prune(original, "prune{ratio=0.5,through-norms=true}")
    assert (64, 32) in [(g["before"], g["after"]) for g in records[0].stats["groups"]]
    table = next(n for n in model.graph.nodes if n.op == "Gather" and isinstance(n.inputs[0], gs.Constant))
    assert np.asarray(table.inputs[0].values).shape == (100, 32)
    ids = {"ids": np.random.default_rng(6).integers(0, 100, (2, 16)).astype(np.int64)}
    oracle = over_kept(masked(original, removed), removed, analysis(original).spaces)
    got, want, plain = (ort.InferenceSession(p.SerializeToString()).run(None, ids)[0]
                        for p in (model.to_proto(), oracle, masked(original, removed)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(plain - want).max() > 1e-3  # the norms over kept channels are another function
