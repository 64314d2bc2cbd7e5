"""Models with ONNX Runtime's com.microsoft ops: fuse-gelu writes FastGelu below opset 20, and ORT-optimized
transformers hold FastGelu, BiasGelu or BiasAdd. onnx's shape inference does not know them and left every value
after them untyped: costs went unknown there, and prune locked the channels they read ("mixes channel axes").
ONNX Runtime's symbolic shape inference types them now (irtool.ir.skeleton._contrib_types)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from irtool.analysis.cost import model_cost
from irtool.api import optimize
from irtool.ir.model import Model
from tests.prune.archs import ARCHS
from tests.prune.test_prune_archs import EXPORTERS, analysis, prepared
from tests.prune.test_prune_masking import masked, prune


def mlp(op: str) -> onnx.ModelProto:
    """x [N, 10, 16] -> MatMul (16 -> 32) -> com.microsoft `op` (with a bias where it takes one) -> MatMul (32 -> 8)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)))]
    operands = {"FastGelu": ["h", "b1"], "BiasGelu": ["h", "b1"], "QuickGelu": ["h"], "Gelu": ["h"]}[op]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node(op, operands, ["g"], domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 8])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)])


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["FastGelu", "BiasGelu", "QuickGelu", "Gelu"])
def test_a_contrib_activation_passes_channels_and_its_bias_is_sliced(op):
    original = mlp(op)
    cost = model_cost(Model.from_proto(original), {"x": [1, 10, 16]})
    assert cost.total_macs == 10 * (16 * 32 + 32 * 8) + 10 * 32 and not cost.unsupported_ops  # one op per element
    model, removed, records = prune(original, "prune{ratio=0.5}")
    assert records[0].stats["channels_removed"] == 16
    x = np.random.default_rng(1).standard_normal((3, 10, 16)).astype(np.float32)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fuse_gelu_then_prune_keeps_the_mlp_channels_free(exporter):
    """ViT at opset 17/18: fuse-gelu writes com.microsoft Gelu (its output keeps the type the export declared), and
    the MLP hidden channels stay prunable."""
    fused = optimize(prepared("vit_b16", exporter), "fuse-gelu").model.to_proto()
    assert any(n.domain == "com.microsoft" for n in fused.graph.node)
    free = lambda proto: sum(g.size for g in analysis(proto).groups if g.locked is None)  # noqa: E731
    assert free(fused) == free(prepared("vit_b16", exporter))
    model, removed, _ = prune(fused, "prune{ratio=0.5}")
    x = np.random.default_rng(2).standard_normal(ARCHS["vit_b16"][1]).astype(np.float32)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(fused, removed), x), rtol=1e-4, atol=1e-4)
